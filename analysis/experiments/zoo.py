"""The model zoo of the experiments: which bundled models, at which size, in which family.

Families are an explicit table of the bundled models (never guessed from a name): the papers
compare CNNs (ResNet, VGG) with Transformers (GPT-2, BERT, ViT) and list MLP-mixer with the latter.
"""

from __future__ import annotations

from .store import check_size

__all__ = ["FAMILIES", "zoo_models"]

FAMILIES: dict[str, str] = {
    "gpt2-nano": "Transformer",
    "bert-mini": "Transformer",
    "vit-tiny": "Transformer",
    "mlp-mixer": "MLP-mixer",
    "resnet18": "CNN",
    "vgg16": "CNN",
}

_SMALL = {
    "gpt2-nano": dict(n_layer=1, n_embd=16, n_head=2, vocab_size=256, context=16),
    "bert-mini": dict(n_layer=1, n_embd=16, n_head=2, vocab_size=257, context=16),
    "vit-tiny": dict(image_size=8, patch_size=4, channels=1, n_layer=1, n_embd=16, n_head=2),
    "mlp-mixer": dict(image_size=8, patch_size=4, channels=1, n_layer=1, n_embd=16, token_hidden=8, channel_hidden=32),
    "resnet18": dict(width=4, layers=(1, 1, 1, 1), channels=1, image_size=8),
    "vgg16": dict(widths=(4, 4, 8, 8, 8), fc_width=16, channels=1),
}
_MEDIUM = {
    "gpt2-nano": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, context=32),
    "bert-mini": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=257, context=32),
    "vit-tiny": dict(image_size=16, patch_size=4, channels=1, n_layer=2, n_embd=64, n_head=4),
    "mlp-mixer": dict(image_size=16, patch_size=4, channels=1, n_layer=2, n_embd=64, token_hidden=32,
                      channel_hidden=128),
    "resnet18": dict(width=8, channels=1, image_size=16),
    "vgg16": dict(widths=(8, 16, 32, 64, 64), fc_width=64, channels=1),
}


def zoo_models(size: str, models: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Bundled model name -> config overrides for ``size`` ("paper": the bundled defaults)."""
    check_size(size)
    names = tuple(FAMILIES) if models is None else models
    unknown = [m for m in names if m not in FAMILIES]
    if unknown:
        raise ValueError(f"not in the experiment zoo: {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    table = {"small": _SMALL, "medium": _MEDIUM, "paper": {}}[size]
    return {name: dict(table.get(name, {})) for name in names}
