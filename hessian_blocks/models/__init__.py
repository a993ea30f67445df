"""The bundled model zoo and ``build_model``, the one way to get a model for the engine.

    spec = build_model("gpt2-nano", seed=0, dtype=torch.float64, n_layer=2)
    loss = spec.loss_fn(spec.model(x), y)

A name is one of MODEL_NAMES (config fields can be overridden by keyword), a Hugging Face model
"hf:ModelClass" or "hf:path/to/config.json" built from its config (see :mod:`.hf`), or a user model
"package.module:factory": the factory is called with the overrides and returns a ModelSpec or an
nn.Module (an nn.Module gets task "custom" and :func:`cross_entropy_loss`). Models come back in eval
mode, initialised from ``seed`` without touching the global RNG, in their own dtype (the zoo's and
Hugging Face's: float32; a user factory's: whatever it built) unless ``dtype`` is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..choices import MODEL_NAMES
from .bert import BERT, BERTConfig
from .gpt import GPT, GPTConfig
from .mixer import MixerConfig, MLPMixer
from .mlp import MLP, MLPConfig
from .resnet import ResNet, ResNetConfig
from .vgg import VGG, VGGConfig
from .vit import ViT, ViTConfig

__all__ = ["MODEL_NAMES", "ModelSpec", "build_model", "cross_entropy_loss"]

IGNORE_INDEX = -100  # targets equal to this (unmasked tokens of masked-LM data) carry no loss


@dataclass
class ModelSpec:
    """A model and what the engine needs to know to feed it and score it.

    Attributes:
        name: the label of the model in tables and folders.
        model: the module, in eval mode.
        loss_fn: ``loss_fn(model_output, targets) -> scalar``, the mean loss over the batch.
        task: the kind of data it takes, which decides the default data and the batches' shapes:
            "image" (x [N, C, H, W] floats, class labels y), "vector" (x [N, F], labels y), "text"
            (token ids x [N, T], next-token targets y [N, T]), "masked-text" (token ids with [MASK] =
            vocab_size - 1, targets the original ids at masked positions and -100 elsewhere) or
            "custom" (data from a file only).
        data_shape: what batches must look like: {"channels", "image_size", "num_classes"} for
            images, {"in_features", "num_classes"} for vectors, {"vocab_size", "context"} for text.
        config: the config the model was built from (None for user factories that return a module).
        keyword_inputs: text batches pass ``input_ids=`` and ``attention_mask=`` keywords (Hugging
            Face style) instead of one positional tensor of token ids.
    """

    name: str
    model: nn.Module
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor]
    task: str
    data_shape: dict
    config: Any
    keyword_inputs: bool = False


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the last dimension of ``logits`` ([..., n_classes]) against ``targets`` ([...]).

    Serves classifiers ([B, C] vs [B]) and language models ([B, T, V] vs [B, T]) alike; targets equal
    to IGNORE_INDEX are left out of the mean.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class _Entry:
    config_cls: type
    model_cls: type
    task: str
    data_keys: tuple[str, ...]  # config fields that make up ModelSpec.data_shape


_IMAGE = ("channels", "image_size", "num_classes")
_TEXT = ("vocab_size", "context")
_REGISTRY: dict[str, _Entry] = {
    "gpt2-nano": _Entry(GPTConfig, GPT, "text", _TEXT),
    "bert-mini": _Entry(BERTConfig, BERT, "masked-text", _TEXT),
    "vit-tiny": _Entry(ViTConfig, ViT, "image", _IMAGE),
    "resnet18": _Entry(ResNetConfig, ResNet, "image", _IMAGE),
    "vgg16": _Entry(VGGConfig, VGG, "image", _IMAGE),
    "mlp": _Entry(MLPConfig, MLP, "vector", ("in_features", "num_classes")),
    "mlp-mixer": _Entry(MixerConfig, MLPMixer, "image", _IMAGE),
}
if tuple(_REGISTRY) != MODEL_NAMES:  # the CLI offers the names from hessian_blocks.choices before torch loads
    raise ImportError(f"hessian_blocks.choices.MODEL_NAMES {MODEL_NAMES} does not list the zoo {tuple(_REGISTRY)}")


def build_model(name: str, *, seed: int = 0, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                **overrides) -> ModelSpec:
    """Build a zoo model, a Hugging Face model ("hf:ModelClass" or "hf:config.json") or a user model
    ("package.module:factory"), seeded, in eval mode; cast to ``dtype`` when given (else it keeps its own).
    ``device``: where the parameters are created (default: the CPU); ``"meta"`` gives their shapes only (no
    memory, no values, any size: the Hugging Face size guard does not apply), enough to map a partition
    measured on a smaller instance onto it."""
    if name in _REGISTRY:
        spec = _build_registered(name, seed, overrides, device)
    elif name.startswith("hf:"):
        from .hf import build_hf_model

        spec = build_hf_model(name[len("hf:"):], seed=seed, device=device, **overrides)
    elif ":" in name:
        spec = _build_user_model(name, seed, overrides, device)
    else:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODEL_NAMES)}, 'hf:ModelClass' "
                         "or 'package.module:factory'")
    if dtype is not None:
        spec.model.to(dtype)
    spec.model.eval()
    return spec


@contextlib.contextmanager
def _seeded(seed: int):
    """Run the body with the CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def _on(device: str | torch.device | None):
    """A context that creates tensors on ``device`` (none given: nothing changes)."""
    return contextlib.nullcontext() if device is None else torch.device(device)


def _build_registered(name: str, seed: int, overrides: dict, device: str | torch.device | None) -> ModelSpec:
    entry = _REGISTRY[name]
    valid = [f.name for f in dataclasses.fields(entry.config_cls)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown config field(s) {', '.join(unknown)}; valid fields: {', '.join(valid)}")
    # lists (from JSON or a command line) stand for the tuple-valued fields
    config = entry.config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    with _seeded(seed), _on(device):
        model = entry.model_cls(config)
    data_shape = {key: getattr(config, key) for key in entry.data_keys}
    return ModelSpec(name, model, cross_entropy_loss, entry.task, data_shape, config)


def _build_user_model(name: str, seed: int, overrides: dict, device: str | torch.device | None) -> ModelSpec:
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"user model {name!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"user model {name!r}: cannot import module {module_name!r}: {e}") from e
    factory = module
    for attr in attr_path.split("."):
        if not hasattr(factory, attr):
            raise ValueError(f"user model {name!r}: module {module_name!r} has no attribute {attr_path!r}")
        factory = getattr(factory, attr)
    if not callable(factory):
        raise TypeError(f"user model {name!r}: {attr_path!r} is not callable")

    try:
        with _seeded(seed), _on(device):
            result = factory(**overrides)
    except (TypeError, ValueError, RuntimeError) as err:
        if not overrides:
            raise
        shown = ", ".join(f"{key}={value!r}" for key, value in overrides.items())
        raise ValueError(
            f"user model {name!r}: the factory failed when called with the config overrides {shown} "
            f"({type(err).__name__}: {err}); check their names and values (on the command line: --set FIELD=VALUE, "
            "where VALUE is read as JSON when it parses, so --set hidden=8 gives the number 8 and --set hidden=abc "
            "the string 'abc')"
        ) from err
    if isinstance(result, ModelSpec):
        return result
    if isinstance(result, nn.Module):
        return ModelSpec(name, result, cross_entropy_loss, "custom", {}, None)
    raise TypeError(f"user model {name!r}: the factory returned {type(result).__name__}; expected a ModelSpec or an "
                    "nn.Module")
