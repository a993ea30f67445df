"""BERT-style encoder with a masked-language-model head; the defaults are "bert-mini".

Post-LN layers as in BERT: x = ln1(x + attn(x)), then x = ln2(x + mlp(x)). Bidirectional attention,
no token-type embedding, no dropout. The decoder to the vocabulary is untied from the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_positive
from .gpt import FeedForward, LayerNorm, SelfAttention, check_heads, init_normal, positions

__all__ = ["BERT", "BERTConfig", "EncoderLayer", "MLMHead"]


@dataclass
class BERTConfig:
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 512
    context: int = 64
    bias: bool = True

    def __post_init__(self):
        check_positive(self, "n_layer", "n_embd", "n_head", "vocab_size", "context")
        check_heads(self.n_embd, self.n_head)


class EncoderLayer(nn.Module):
    """Post-LN Transformer encoder layer."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True):
        super().__init__()
        self.attn = SelfAttention(n_embd, n_head, bias=bias, causal=False)
        self.ln1 = LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, 4 * n_embd, bias=bias)
        self.ln2 = LayerNorm(n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder to vocabulary logits."""

    def __init__(self, n_embd: int, vocab_size: int, bias: bool = True):
        super().__init__()
        self.dense = nn.Linear(n_embd, n_embd, bias=bias)
        self.ln = LayerNorm(n_embd, bias=bias)
        self.decoder = nn.Linear(n_embd, vocab_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(x))))


class BERT(nn.Module):
    """Token ids [B, T] (T <= context) -> masked-LM logits [B, T, vocab_size]."""

    def __init__(self, config: BERTConfig | None = None):
        super().__init__()
        self.config = config = config or BERTConfig()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context, config.n_embd)
        self.ln_emb = LayerNorm(config.n_embd, bias=config.bias)
        self.blocks = nn.ModuleList(
            EncoderLayer(config.n_embd, config.n_head, bias=config.bias) for _ in range(config.n_layer)
        )
        self.head = MLMHead(config.n_embd, config.vocab_size, bias=config.bias)
        self.apply(init_normal)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.ln_emb(self.wte(idx) + self.wpe(positions(idx, self.config.context)))
        for block in self.blocks:
            x = block(x)
        return self.head(x)
