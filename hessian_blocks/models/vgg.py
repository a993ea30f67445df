"""VGG16-style network without BatchNorm ("vgg16"; 32x32 images, 10 classes).

Thirteen 3x3 convolutions + ReLU in five stages of (2, 2, 3, 3, 3), a 2x2 max-pool after each stage,
then three fully connected layers (ReLU between them, no dropout). Widths are configurable: the
small defaults, stages (8, 16, 32, 64, 64) and FC width 64, scale down VGG16's (64, ..., 512) and 4096.

Initialisation: torchvision's for VGG16 (convolutions Kaiming-normal on fan-out, linear weights
normal with std 0.01, zero biases), except that a narrower classifier keeps the gain of VGG16's:
std * sqrt(fan_in) of each linear layer equals VGG16's at 224x224 inputs. A fixed std 0.01 at fan-in
64 instead of 4096 or 25088 shrinks the logits at initialisation about 3000-fold (2e-5 against VGG16's
0.07 on unit-variance inputs), and SGD then does not move such a network off the chance loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .checks import check_positive

__all__ = ["CONVS_PER_STAGE", "VGG", "VGG16_CLASSIFIER_FAN_IN", "VGGConfig"]

CONVS_PER_STAGE = (2, 2, 3, 3, 3)
VGG16_CLASSIFIER_FAN_IN = (512 * 7 * 7, 4096, 4096)  # VGG16's three linear layers at 224x224 inputs


@dataclass
class VGGConfig:
    widths: tuple[int, ...] = (8, 16, 32, 64, 64)  # channels of the five stages
    fc_width: int = 64
    channels: int = 3
    image_size: int = 32  # a multiple of 32: five 2x2 poolings
    num_classes: int = 10

    def __post_init__(self):
        check_positive(self, "fc_width", "channels", "image_size", "num_classes", sequences=("widths",))
        if len(self.widths) != len(CONVS_PER_STAGE):
            raise ValueError(f"widths={self.widths} must be {len(CONVS_PER_STAGE)} positive channel counts")
        if self.image_size < 32 or self.image_size % 32 != 0:
            raise ValueError(f"image_size={self.image_size} must be a positive multiple of 32 (five 2x2 poolings)")


class VGG(nn.Module):
    """Images [B, channels, image_size, image_size] -> class logits [B, num_classes]."""

    def __init__(self, config: VGGConfig | None = None):
        super().__init__()
        self.config = config = config or VGGConfig()
        layers, in_ch = [], config.channels
        for width, n_convs in zip(config.widths, CONVS_PER_STAGE):
            for _ in range(n_convs):
                layers += [nn.Conv2d(in_ch, width, kernel_size=3, padding=1), nn.ReLU()]
                in_ch = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        side = config.image_size // 32
        self.classifier = nn.Sequential(
            nn.Linear(in_ch * side * side, config.fc_width),
            nn.ReLU(),
            nn.Linear(config.fc_width, config.fc_width),
            nn.ReLU(),
            nn.Linear(config.fc_width, config.num_classes),
        )

        for layer in self.features:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        linears = [layer for layer in self.classifier if isinstance(layer, nn.Linear)]
        for linear, vgg16_fan_in in zip(linears, VGG16_CLASSIFIER_FAN_IN, strict=True):
            nn.init.normal_(linear.weight, mean=0.0, std=0.01 * math.sqrt(vgg16_fan_in / linear.in_features))
            nn.init.zeros_(linear.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))
