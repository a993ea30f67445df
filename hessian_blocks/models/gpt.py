"""GPT-2-style decoder-only Transformer; the defaults are "gpt2-nano".

Written for Hessian work: attention is spelled out (q @ k^T, causal mask, softmax, @ v) instead of a
fused kernel, there is no dropout and no in-place op on anything that needs a gradient, so the loss
can be differentiated twice (double backward, and forward-over-reverse with torch.func).

The attention, feed-forward and pre-LN block defined here are shared with the BERT, ViT and
MLP-Mixer files of the zoo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_positive

__all__ = [
    "GPT", "Block", "check_heads", "FeedForward", "GPTConfig", "init_normal", "LayerNorm", "positions",
    "SelfAttention"
]


@dataclass
class GPTConfig:
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    vocab_size: int = 512
    context: int = 64  # longest sequence the position embedding covers
    bias: bool = True  # biases in Linear and LayerNorm layers

    def __post_init__(self):
        check_positive(self, "n_layer", "n_embd", "n_head", "vocab_size", "context")
        check_heads(self.n_embd, self.n_head)


def check_heads(n_embd: int, n_head: int) -> None:
    if n_head < 1 or n_embd % n_head != 0:
        raise ValueError(f"n_embd={n_embd} must be a positive multiple of n_head={n_head}")


class LayerNorm(nn.Module):
    """LayerNorm over the last dimension (weight, optional bias), written with plain tensor ops.

    Same parameters and values as nn.LayerNorm. The fused kernel is avoided on purpose: in torch 2.13
    its backward, once run under vmap (torch.func.hessian, jacrev of jacrev, batched vjps), gives
    wrong second derivatives for the weight (pytorch/functorch#534); these ops compose correctly.
    """

    def __init__(self, dim: int, bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(dim=-1, keepdim=True)
        variance = centred.pow(2).mean(dim=-1, keepdim=True)  # biased, as in nn.LayerNorm
        y = centred * torch.rsqrt(variance + self.eps) * self.weight
        return y if self.bias is None else y + self.bias


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate query, key, value and output projections."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, causal: bool = False):
        super().__init__()
        self.n_head = n_head
        self.causal = causal
        self.q_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.k_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.v_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.o_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        head_dim = C // self.n_head

        def heads(t):  # [B, T, C] -> [B, n_head, T, head_dim]
            return t.reshape(B, T, self.n_head, head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # [B, n_head, T, T]
        if self.causal:  # a static flag of the module, not a property of the data
            future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        y = scores.softmax(dim=-1) @ v  # [B, n_head, T, head_dim]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, acting on the last dimension."""

    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-LN Transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, causal: bool = False):
        super().__init__()
        self.ln1 = LayerNorm(n_embd, bias=bias)
        self.attn = SelfAttention(n_embd, n_head, bias=bias, causal=causal)
        self.ln2 = LayerNorm(n_embd, bias=bias)
        self.mlp = FeedForward(n_embd, 4 * n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def init_normal(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT initialisation, for use with ``Module.apply``: N(0, std) weights, zero biases.

    Linear and Embedding layers only; LayerNorm keeps its (1, 0) initialisation.
    """
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def positions(idx: torch.Tensor, context: int) -> torch.Tensor:
    """Position ids 0..T-1 for token ids [B, T]; T beyond the position table is an error."""
    T = idx.shape[1]
    if T > context:
        raise ValueError(f"sequence length {T} exceeds the context of {context}")
    return torch.arange(T, device=idx.device)


class GPT(nn.Module):
    """Token ids [B, T] (T <= context) -> next-token logits [B, T, vocab_size]."""

    def __init__(self, config: GPTConfig | None = None):
        super().__init__()
        self.config = config = config or GPTConfig()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context, config.n_embd)
        self.blocks = nn.ModuleList(
            Block(config.n_embd, config.n_head, bias=config.bias, causal=True) for _ in range(config.n_layer)
        )
        self.ln_f = LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)  # untied from wte

        self.apply(init_normal)
        # GPT-2: the projections that write into the residual stream are scaled by 1/sqrt(2 * n_layer).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(positions(idx, self.config.context))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
