"""ResNet18-style network ("resnet18"; CIFAR-style stem for small images by default, 10 classes).

BasicBlocks in four stages of ``layers`` = (2, 2, 2, 2) blocks with widths width * (1, 2, 4, 8);
stride 2 at the start of stages 2-4; 1x1 conv + BatchNorm shortcuts where the shape changes;
global average pooling and a linear head. The stem is a 3x3 convolution (``stem="cifar"``), or the
ImageNet ResNet's 7x7 stride-2 convolution and 3x3 stride-2 max pooling (``stem="imagenet"``: with
width 64, 224x224 images and 1000 classes, the ResNet18 of the papers' Table 1). In eval mode (as the
registry returns it) BatchNorm uses its running statistics, so the network is a fixed, deterministic
function of its parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_positive

__all__ = ["BasicBlock", "conv3x3", "ResNet", "ResNetConfig"]


STEMS = ("cifar", "imagenet")


@dataclass
class ResNetConfig:
    width: int = 16  # channels of the stem and the first stage
    layers: tuple[int, ...] = (2, 2, 2, 2)  # BasicBlocks per stage
    channels: int = 3
    image_size: int = 32  # any size works (global pooling); recorded for the data
    num_classes: int = 10
    stem: str = "cifar"  # "cifar": 3x3 conv; "imagenet": 7x7 stride-2 conv + 3x3 stride-2 max pooling

    def __post_init__(self):
        check_positive(self, "width", "channels", "image_size", "num_classes", sequences=("layers",))
        if not self.layers:
            raise ValueError("ResNetConfig.layers must name at least one stage, e.g. (2, 2, 2, 2)")
        if self.stem not in STEMS:
            raise ValueError(f"ResNetConfig.stem must be one of {', '.join(STEMS)}, got {self.stem!r}")


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()  # identity
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Images [B, channels, H, W] -> class logits [B, num_classes]."""

    def __init__(self, config: ResNetConfig | None = None):
        super().__init__()
        self.config = config = config or ResNetConfig()
        if config.stem == "imagenet":
            self.conv1 = nn.Conv2d(config.channels, config.width, kernel_size=7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(config.channels, config.width)
        self.bn1 = nn.BatchNorm2d(config.width)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if config.stem == "imagenet" else nn.Identity()
        stages, in_ch = [], config.width
        for i, n_blocks in enumerate(config.layers):
            out_ch = config.width * 2**i
            strides = [1 if i == 0 else 2] + [1] * (n_blocks - 1)
            blocks = []
            for stride in strides:
                blocks.append(BasicBlock(in_ch, out_ch, stride))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(in_ch, config.num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(images))))
        x = self.stages(x)
        return self.fc(x.mean(dim=(2, 3)))
