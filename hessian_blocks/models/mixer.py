"""MLP-Mixer ("mlp-mixer"; 32x32 images, 10 classes).

Patch embedding, then blocks of token mixing (an MLP across patches, per channel) and channel
mixing (an MLP across channels, per patch), each pre-LN with a residual; final LayerNorm, mean over
patches, linear head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .checks import check_positive
from .gpt import FeedForward, LayerNorm
from .vit import PatchEmbed, check_patches

__all__ = ["MixerBlock", "MixerConfig", "MLPMixer"]


@dataclass
class MixerConfig:
    image_size: int = 32
    patch_size: int = 4
    channels: int = 3
    num_classes: int = 10
    n_layer: int = 4
    n_embd: int = 64
    token_hidden: int = 32  # hidden width of the token-mixing MLP
    channel_hidden: int = 256  # hidden width of the channel-mixing MLP

    def __post_init__(self):
        check_positive(self, "image_size", "patch_size", "channels", "num_classes", "n_layer", "n_embd",
                       "token_hidden", "channel_hidden")
        check_patches(self.image_size, self.patch_size)


class MixerBlock(nn.Module):
    def __init__(self, n_patches: int, n_embd: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.ln1 = LayerNorm(n_embd)
        self.token_mlp = FeedForward(n_patches, token_hidden)
        self.ln2 = LayerNorm(n_embd)
        self.channel_mlp = FeedForward(n_embd, channel_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, n_patches, n_embd]
        x = x + self.token_mlp(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.ln2(x))


class MLPMixer(nn.Module):
    """Images [B, channels, image_size, image_size] -> class logits [B, num_classes]."""

    def __init__(self, config: MixerConfig | None = None):
        super().__init__()
        self.config = config = config or MixerConfig()
        n_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embed = PatchEmbed(config.channels, config.n_embd, config.patch_size)
        self.blocks = nn.ModuleList(
            MixerBlock(n_patches, config.n_embd, config.token_hidden, config.channel_hidden)
            for _ in range(config.n_layer)
        )
        self.ln_f = LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x).mean(dim=1))
