"""Vision Transformer; the defaults are "vit-tiny" (32x32 RGB images, 10 classes).

Patch embedding (a Conv2d with stride = kernel = patch size), a learned class token and position
embedding, pre-LN blocks with separate q, k, v, o projections (shared with gpt.py, not causal), a
final LayerNorm and a linear head on the class token. No dropout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .checks import check_positive
from .gpt import Block, LayerNorm, check_heads, init_normal

__all__ = ["check_patches", "PatchEmbed", "ViT", "ViTConfig"]


@dataclass
class ViTConfig:
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    num_classes: int = 10
    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    bias: bool = True

    def __post_init__(self):
        check_positive(self, "image_size", "patch_size", "channels", "num_classes", "n_layer", "n_embd", "n_head")
        check_heads(self.n_embd, self.n_head)
        check_patches(self.image_size, self.patch_size)


def check_patches(image_size: int, patch_size: int) -> None:
    if patch_size < 1 or image_size % patch_size != 0:
        raise ValueError(f"image_size={image_size} must be a positive multiple of patch_size={patch_size}")


class PatchEmbed(nn.Module):
    """Images [B, C, H, W] -> patch tokens [B, (H/p) * (W/p), n_embd]."""

    def __init__(self, channels: int, n_embd: int, patch_size: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(channels, n_embd, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    """Images [B, channels, image_size, image_size] -> class logits [B, num_classes]."""

    def __init__(self, config: ViTConfig | None = None):
        super().__init__()
        self.config = config = config or ViTConfig()
        n_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = PatchEmbed(config.channels, config.n_embd, config.patch_size, bias=config.bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.n_embd))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patches + 1, config.n_embd))
        self.blocks = nn.ModuleList(
            Block(config.n_embd, config.n_head, bias=config.bias, causal=False) for _ in range(config.n_layer)
        )
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.num_classes, bias=config.bias)

        self.apply(init_normal)  # the patch Conv2d keeps PyTorch's default initialisation
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x)[:, 0])
