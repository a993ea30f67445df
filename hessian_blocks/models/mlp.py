"""Multi-layer perceptron ("mlp"): vectors [B, in_features] -> class logits [B, num_classes].

Inputs with more dimensions (e.g. images) are flattened after the batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_positive

__all__ = ["ACTIVATIONS", "MLP", "MLPConfig"]

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu}


@dataclass
class MLPConfig:
    in_features: int = 64
    hidden_sizes: tuple[int, ...] = (64, 64)
    num_classes: int = 10
    activation: str = "relu"  # one of ACTIVATIONS
    bias: bool = True

    def __post_init__(self):
        check_positive(self, "in_features", "num_classes", sequences=("hidden_sizes",))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not one of {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    def __init__(self, config: MLPConfig | None = None):
        super().__init__()
        self.config = config = config or MLPConfig()
        sizes = (config.in_features, *config.hidden_sizes)
        self.hidden = nn.ModuleList(nn.Linear(a, b, bias=config.bias) for a, b in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(sizes[-1], config.num_classes, bias=config.bias)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.hidden:
            x = self.act(layer(x))
        return self.out(x)
