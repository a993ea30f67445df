"""Hugging Face Transformers models built from their config classes: random weights, no downloads.

    spec = build_model("hf:LlamaForCausalLM", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    spec = build_model("hf:path/to/config.json")            # the class is the file's "architectures"[0]
    spec = spec_from_config(config, seed=0)                  # from a config object (any model class of it)

The config class is the model class's own (``LlamaForCausalLM.config_class`` is ``LlamaConfig``):
its defaults, overridden by keyword (``--set FIELD=VALUE`` on the command line). Unknown fields are
errors (a config would keep a misspelt one silently). ``context`` is not a config field: it is the
tokens per sample of the data (default: :data:`DEFAULT_CONTEXT`, at most the model's positions).

Every model is built with eager attention (``attn_implementation="eager"``: fused attention kernels
have no second derivative; the engine also forces ``scaled_dot_product_attention`` onto its math
backend), eager experts in a mixture of experts (``experts_implementation="eager"``: the grouped
product Transformers prefers takes no float64 and has no second derivative) and without a key/value
cache, seeded, in eval mode. Its task comes from the Transformers registries: a causal LM
(next-token targets, task "text") or a masked LM (task "masked-text"); batches pass ``input_ids`` and
``attention_mask`` as keywords, and the loss is the models' own token cross-entropy (targets -100
ignored: unmasked tokens, padding) computed from ``output.logits`` in the logits' dtype. (The
Transformers loss functions cast logits to float32, which would make a float64 measurement
float32-accurate.) Models larger than :data:`MAX_PARAMETERS` are refused before any weight is
allocated: Transformers' default configs are the full-size models (a default Llama has 6.7 billion
parameters); ``device="meta"`` builds any size (shapes only). A config that Transformers refuses is
one ``ValueError`` naming the fields to change; special token ids of the family's defaults that fall
outside a shrunk vocabulary move inside it.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import ModelSpec, _seeded, cross_entropy_loss

__all__ = ["DEFAULT_CONTEXT", "HF_PREFIX", "MAX_PARAMETERS", "build_hf_model", "logits_cross_entropy",
           "spec_from_config"]

HF_PREFIX = "hf:"
DEFAULT_CONTEXT = 64  # tokens per sample unless --set context=N
MAX_PARAMETERS = 10**9
_BUILD_DEFAULTS = {"attn_implementation": "eager", "use_cache": False}
# a small model, in the config fields most architectures share (named where the config has them)
_SMALL = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 512}


def logits_cross_entropy(output: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of a Transformers output's ``logits`` against ``targets`` (-100 ignored)."""
    return cross_entropy_loss(output.logits, targets)


def build_hf_model(source: str, *, seed: int = 0, device: str | torch.device | None = None,
                   **overrides: Any) -> ModelSpec:
    """The model named by ``source`` (what follows ``hf:``): a model class of ``transformers``
    (``LlamaForCausalLM``) or the path of a ``config.json`` (its class is ``architectures[0]``);
    ``device`` as in :func:`spec_from_config` (``"meta"``: shapes only, any size)."""
    transformers = _transformers()
    context = overrides.pop("context", None)
    if source.endswith(".json") or Path(source).is_file():
        config_cls, model_cls, fields = _from_config_file(transformers, source)
    else:
        model_cls = getattr(transformers, source, None)
        if not (isinstance(model_cls, type) and issubclass(model_cls, nn.Module)
                and hasattr(model_cls, "config_class")):
            close = difflib.get_close_matches(source,
                                              [n for n in dir(transformers) if n.endswith(("LM", "LMHeadModel"))], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"hf:{source}: transformers has no model class {source!r}{hint}; name one like "
                             "hf:LlamaForCausalLM or give the path of a config.json")
        config_cls, fields = model_cls.config_class, {}
    label = f"{HF_PREFIX}{source}"
    _check_fields(config_cls, overrides, label)
    settings = {**_BUILD_DEFAULTS, **fields, **overrides}
    settings.update(_special_ids_in_vocabulary(config_cls, settings, overrides, label))
    try:
        config = config_cls(**settings)
    except _config_errors() as err:
        raise _config_error(err, label, config_cls, overrides) from err
    return spec_from_config(config, model_cls, seed=seed, context=context, name=label, device=device)


def spec_from_config(config: Any, model_cls: type | None = None, *, seed: int = 0, context: int | None = None,
                     name: str | None = None, device: str | torch.device | None = None) -> ModelSpec:
    """A :class:`ModelSpec` of ``model_cls`` (default: the config's ``architectures[0]``) built from the
    Transformers config object ``config``: seeded, eval mode, eager attention and experts (unless the
    config names another implementation; the engine then still runs SDPA on its math backend); refused above
    :data:`MAX_PARAMETERS`. ``context``: tokens per sample (default: :data:`DEFAULT_CONTEXT`, at most
    the model's ``max_position_embeddings``). ``device="meta"`` builds the parameters' shapes only (no
    memory, no values, any size): enough to map a partition measured on a smaller instance."""
    transformers = _transformers()
    if model_cls is None:
        architectures = getattr(config, "architectures", None) or []
        if not architectures:
            raise ValueError(f"{type(config).__name__} names no model class (architectures is empty): pass model_cls")
        model_cls = getattr(transformers, architectures[0], None)
        if model_cls is None:
            raise ValueError(f"transformers {transformers.__version__} has no model class {architectures[0]!r} "
                             f"(the architectures of {type(config).__name__}): pass model_cls")
    label = name or f"{HF_PREFIX}{model_cls.__name__}"
    task = _task(model_cls, label)
    positions = getattr(config, "max_position_embeddings", None)
    if context is None:
        context = min(DEFAULT_CONTEXT, positions) if positions else DEFAULT_CONTEXT
    if not (isinstance(context, int) and not isinstance(context, bool) and context >= 1):
        raise ValueError(f"{label}: context (tokens per sample) must be a positive integer, got {context!r}")
    if positions and context > positions:
        raise ValueError(f"{label}: context {context} exceeds the model's {positions} positions "
                         f"(max_position_embeddings): use --set context={positions} or less")
    config._attn_implementation = getattr(config, "_attn_implementation", None) or "eager"
    if hasattr(config, "_experts_implementation"):  # mixtures of experts: one matrix product per expert
        config._experts_implementation = getattr(config, "_experts_implementation", None) or "eager"
    meta = device is not None and torch.device(device).type == "meta"
    if not meta:
        _check_size(model_cls, config, label)
    with _seeded(seed), (torch.device(device) if device is not None else contextlib.nullcontext()):
        model = _instantiate(model_cls, config, label)
    model.eval()
    data_shape = {"vocab_size": config.vocab_size, "context": context}
    return ModelSpec(label, model, logits_cross_entropy, task, data_shape, config, keyword_inputs=True)


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError("hf: models need the transformers package: pip install 'hessian-blocks[hf]'") from err
    return transformers


def _from_config_file(transformers, source: str) -> tuple[type, type, dict]:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"hf:{source}: no such config file")
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"hf:{source} is not a JSON config file: {err}") from err
    architectures = fields.get("architectures") if isinstance(fields, dict) else None
    if not architectures:
        raise ValueError(f"hf:{source}: the config names no model class: add \"architectures\": [\"LlamaForCausalLM\"] "
                         "(or the class you want) to it, or use hf:<ModelClass> with --set")
    model_cls = getattr(transformers, architectures[0], None)
    if model_cls is None:
        raise ValueError(f"hf:{source}: transformers {transformers.__version__} has no model class "
                         f"{architectures[0]!r}")
    fields = {k: v for k, v in fields.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    return model_cls.config_class, model_cls, fields


def _known_fields(config_cls: type) -> set[str]:
    """The fields a config class takes: its attributes, their aliases and its constructor's keywords."""
    known = set(config_cls().to_dict()) | set(getattr(config_cls, "attribute_map", {}))
    known |= {p for p in inspect.signature(config_cls.__init__).parameters if p not in ("self", "kwargs")}
    return known | set(_BUILD_DEFAULTS)


def _check_fields(config_cls: type, overrides: dict, label: str) -> None:
    """Refuse override names the config class does not know (it would keep them as unused attributes)."""
    known = _known_fields(config_cls)
    unknown = sorted(set(overrides) - known)
    if unknown:
        hints = [f"{field} (did you mean {', '.join(difflib.get_close_matches(field, known, n=2))}?)"
                 if difflib.get_close_matches(field, known, n=1) else field for field in unknown]
        raise ValueError(f"{label}: {config_cls.__name__} has no field(s) {', '.join(hints)}; "
                         "--set takes fields of the model's config (and context, the tokens per sample)")


def _task(model_cls: type, label: str) -> str:
    from transformers.models.auto import modeling_auto

    if model_cls.__name__ in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "text"
    if model_cls.__name__ in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES.values():
        return "masked-text"
    raise ValueError(f"{label}: {model_cls.__name__} is neither a causal nor a masked language model; hf: takes those "
                     "(e.g. LlamaForCausalLM, GPT2LMHeadModel, BertForMaskedLM). For another head write a factory "
                     "'package.module:factory' returning a ModelSpec (see docs/huggingface.md)")


def _check_size(model_cls: type, config: Any, label: str) -> None:
    """Count the parameters on the meta device (no memory) and refuse models above MAX_PARAMETERS."""
    with torch.device("meta"):
        count = sum(p.numel() for p in _instantiate(model_cls, config, label).parameters())
    if count > MAX_PARAMETERS:
        known = _known_fields(type(config))
        shrink = " ".join(f"--set {field}={value}" for field, value in _SMALL.items() if field in known)
        raise ValueError(f"{label} with this config has {count / 1e9:.2f} billion parameters (more than "
                         f"{MAX_PARAMETERS:.0e}): Transformers' defaults are the full-size model. Make it smaller, "
                         f"e.g. {shrink} (hessian-blocks partition --small auto needs only its shapes and takes any "
                         "size)")


def _special_ids_in_vocabulary(config_cls: type, settings: dict, overrides: dict, label: str) -> dict:
    """New values for the special token ids (``*_token_id``: bos, eos, pad, ...) that the family's
    defaults (or a config file) put outside a vocabulary the user shrank: bos, eos and the others become
    the last id, ``vocab_size - 1``; pad becomes None (a pad id inside the vocabulary would freeze that
    token's embedding row through ``padding_idx``; the batches never pad). Ids the user set (``--set``)
    outside the vocabulary are an error naming the field and the fix."""
    defaults = config_cls().to_dict()
    vocab = settings.get("vocab_size", defaults.get("vocab_size"))
    if not (isinstance(vocab, int) and vocab >= 1):
        return {}
    changes = {}
    for field in sorted(f for f in _known_fields(config_cls) if f.endswith("_token_id")):
        value = settings.get(field, defaults.get(field))
        ids = value if isinstance(value, list) else [value]
        outside = [i for i in ids if isinstance(i, int) and not 0 <= i < vocab]
        if not outside:
            continue
        if field in overrides:
            raise ValueError(f"{label}: {field}={value} is outside the vocabulary of {vocab} ids (vocab_size): use "
                             f"--set {field}=N with 0 <= N < {vocab}, or a larger vocab_size")
        if field == "pad_token_id":
            changes[field] = None
        elif isinstance(value, list):
            changes[field] = list(dict.fromkeys(i if i not in outside else vocab - 1 for i in ids))
        else:
            changes[field] = vocab - 1
    return changes


def _config_errors() -> tuple[type[Exception], ...]:
    """What Transformers raises for a config it refuses (at construction or when building the model)."""
    try:
        from huggingface_hub.errors import StrictDataclassError  # configs validated as strict dataclasses
    except ImportError:
        return (ValueError, TypeError)
    return (ValueError, TypeError, StrictDataclassError)


def _instantiate(model_cls: type, config: Any, label: str) -> nn.Module:
    """``model_cls(config)``; a config the model refuses is a ValueError naming the fields (see _config_error)."""
    try:
        return model_cls(config)
    except _config_errors() as err:
        defaults = type(config)().to_dict()
        changed = {k: v for k, v in config.to_dict().items() if k in defaults and defaults[k] != v}
        raise _config_error(err, label, type(config), changed) from err


def _config_error(err: Exception, label: str, config_cls: type, settings: dict) -> ValueError:
    """One line for a config that Transformers refuses: its reason, the config fields the reason names
    (as words, ``hidden size``, ``number of attention heads``, or by name) and the ones it quotes by
    value among ``settings`` (what the user set), and that ``--set`` changes them."""
    reason = str(err.__cause__ if err.__cause__ is not None and not isinstance(err, (ValueError, TypeError))
                 else err).strip()
    text = " ".join(reason.lower().replace("`", " ").replace("_", " ").split())
    known = _known_fields(config_cls) - set(_BUILD_DEFAULTS)
    named = {}
    for field in known:
        words = field.replace("_", " ")
        phrases = [words] + ([f"number of {words[len('num '):]}"] if words.startswith("num ") else [])
        positions = [m.start() for phrase in phrases for m in re.finditer(rf"\b{re.escape(phrase)}\b", text)]
        if positions:
            named[field] = min(positions)
    named = {f: at for f, at in named.items()  # a field's words inside a longer field's: the longer one only
             if not any(other != f and other.endswith(f) and named[other] <= at for other in named)}
    numbers = set(re.findall(r"-?\d+(?:\.\d+)?", reason))
    quoted = [f for f, v in settings.items() if f not in named and f in known and not isinstance(v, bool)
              and isinstance(v, (int, float)) and str(v) in numbers]
    fields = sorted(named, key=named.get) + quoted
    shown = ", ".join(f"{f}={settings[f]}" if f in settings else f"{f} (not set)" for f in fields)
    yours = ", ".join(f"{k}={v}" for k, v in settings.items())
    if fields:
        fix = f"the fields it names: {shown}; change them with --set FIELD=VALUE"
        if yours and not set(fields) & set(settings):
            fix += f" (you set {yours})"
    else:
        fix = f"you set {yours}; change them with --set FIELD=VALUE" if yours else "change its fields with --set"
    return ValueError(f"{label}: {config_cls.__name__} refuses this config: {' '.join(reason.split())} ({fix})")
