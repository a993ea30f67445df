"""Offline data for the model zoo: fixed, seeded lists of (inputs, targets) batches.

Sources (nothing is downloaded):
- "digits": scikit-learn's bundled 8x8 handwritten digits (1797 images), scaled to [0, 1] and
  normalised, resized bilinearly to the model's image size and repeated over its channels; for
  vector models the 64 pixels as features.
- "text": byte-level tokens of the English documentation bundled with Python (`pydoc_data`), windows
  at seeded random offsets; next-token targets, or a seeded 15% [MASK] for masked-LM models. A vocabulary
  smaller than the 256 byte values (257 with [MASK]) takes byte b as token b mod its size, with a warning.
- "synthetic": seeded Gaussian inputs and uniform random labels/tokens of the right shapes.
- a path to a .pt file (dict with "x" and "y" tensors, or a list of (x, y) batches), an .npz file
  (arrays "x" and "y") or a .txt file (UTF-8 text, byte-level tokens): samples taken in file order.
  For models with keyword inputs, a .pt / .npz file may hold an "attention_mask" of x's shape (1: token,
  0: padding): the model gets it, and targets at padding become -100 (no loss).
"auto" picks digits for image models, text for (masked) language models, synthetic for vectors.

Batches are (inputs, targets) pairs. Inputs are one tensor, except for models whose ModelSpec has
``keyword_inputs`` (Hugging Face models): a dict ``{"input_ids": ..., "attention_mask": ...}`` passed
as keywords. :func:`call_model` and :func:`batch_to` handle both forms.

``split="train"`` / ``"validation"`` draw from disjoint parts of a source, so that validation data is
held out: the last ``validation_fraction`` of the bundled text, of a text file's bytes or of a data
file's samples, and of a fixed shuffle of the digits, is the validation part; the rest the training
part. Synthetic data has no pool: its validation samples come from another random stream.
"""

from __future__ import annotations

import functools
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import batch_to, call_model
from .choices import DATA_SOURCES
from .models import IGNORE_INDEX, ModelSpec

__all__ = ["DATA_SOURCES", "SPLITS", "batch_to", "call_model", "make_batches", "samples_available"]

SPLITS: tuple[str, ...] = ("all", "train", "validation")
# offset of the validation draws' seed: torch's CPU generator keeps 32 bits of a seed, and seeds below
# 2**31 then never meet a validation stream
_VALIDATION_STREAM = 2**31
MASK_FRACTION = 0.15
TEXT_TASKS = ("text", "masked-text")
_AUTO = {"image": "digits", "text": "text", "masked-text": "text", "vector": "synthetic"}
_FILE_SUFFIXES = (".pt", ".npz", ".txt")
_TEXT_DATA = ("text: the data source text (= auto), synthetic, a .txt file, or a .pt / .npz file of token ids "
              "x and y [N, T]")
_FITTING_DATA = {  # the data each task takes, named by mismatch errors
    "image": "images: the data source digits (= auto), synthetic, or a .pt / .npz file of images x [N, C, H, W] "
             "and class labels y",
    "vector": "vectors: the data source synthetic (= auto), digits (64 features), or a .pt / .npz file of vectors "
              "x [N, F] and class labels y",
    "text": _TEXT_DATA,
    "masked-text": _TEXT_DATA,
}
# the fix named by every "too few samples" error
_FEWER_SAMPLES = ("ask for fewer or smaller batches (on the command line: --batch-size, with --batches for "
                  "spectrum / js / partition or --val-batches for compare)")


def make_batches(
    spec: ModelSpec,
    source: str = "auto",
    *,
    batch_size: int = 8,
    n_batches: int = 4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    last_batch_size: int | None = None,
    split: str = "all",
    validation_fraction: float = 0.1,
) -> list[tuple[Any, torch.Tensor]]:
    """`n_batches` batches of `batch_size` samples (the last one `last_batch_size` if given) for `spec`.

    The same arguments always give identical tensors. Float inputs and targets are cast to `dtype`
    (default: the dtype of the model's parameters); token ids and class labels are torch.long.
    ``split`` ("all", "train" or "validation") and ``validation_fraction`` choose the part of the
    source drawn from (see the module docstring). Inputs are a dict of keyword tensors for a spec
    with ``keyword_inputs``, else one tensor.
    """
    part = _Part(split, validation_fraction)
    sizes = _batch_sizes(batch_size, n_batches, last_batch_size)
    n = sum(sizes)
    gen = torch.Generator().manual_seed(seed + (_VALIDATION_STREAM if split == "validation" else 0))
    source = _resolve(spec, source)
    mask = None  # attention mask (text files only)
    if source == "digits":
        x, y = _digits(spec, n, gen, part)
    elif source == "text":
        x, y = _text_windows(spec, part.of(_bundled_text()), n, gen, f"the bundled text{part.label}",
                             random_offsets=True)
    elif source == "synthetic":
        x, y = _synthetic(spec, n, gen)
    else:
        x, y, mask = _from_file(spec, _data_file(source), n, gen, part)

    dtype = dtype or _model_dtype(spec.model)
    x, y = _cast(x, dtype), _cast(y, dtype)
    if not spec.keyword_inputs:
        return [(xb.clone(), yb.clone()) for xb, yb in zip(x.split(sizes), y.split(sizes))]
    mask = torch.ones_like(x) if mask is None else mask.long()
    return [({"input_ids": xb.clone(), "attention_mask": mb.clone()}, yb.clone())
            for xb, mb, yb in zip(x.split(sizes), mask.split(sizes), y.split(sizes))]


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 for a model without one)."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def samples_available(
    spec: ModelSpec, source: str = "auto", *, split: str = "all", validation_fraction: float = 0.1
) -> int | None:
    """How many samples :func:`make_batches` can draw from ``source``'s ``split`` part; None where
    there is no limit (text windows at random offsets, synthetic data)."""
    part = _Part(split, validation_fraction)
    source = _resolve(spec, source)
    if source == "digits":
        return len(part.of(torch.arange(len(_digits_dataset()[0]))))
    if source in ("text", "synthetic"):
        return None
    path = _data_file(source)
    if path.suffix.lower() == ".txt":
        _check_text_model(spec, f"file {path}")
        (context,) = _need(spec, "context")
        extra = 0 if spec.task == "masked-text" else 1  # next-token targets read one token past a window
        return max(0, (len(part.of(_bytes_to_tokens(path.read_bytes()))) - extra) // context)
    x, _, _ = _load_samples(path)
    return len(part.of(x))


def _resolve(spec: ModelSpec, source: str) -> str:
    if source != "auto":
        return source
    if spec.task not in _AUTO:
        raise ValueError(
            f"model {spec.name!r} has task {spec.task!r}, which has no default data: pass a data file "
            f"(.pt, .npz, .txt), or have the factory return a ModelSpec with one of the tasks {', '.join(_AUTO)}"
        )
    return _AUTO[spec.task]


def _data_file(source: str) -> Path:
    """``source`` as the path of an existing data file of a supported kind, else an error naming the choices."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"data source {source!r} is neither one of auto, {', '.join(DATA_SOURCES)} nor an existing file: "
            "pass one of those names or the path of a .pt, .npz or .txt file"
        )
    if path.suffix.lower() not in _FILE_SUFFIXES:
        raise ValueError(f"unsupported data file {path}: expected .pt, .npz or .txt")
    return path


def _fitting_data(spec: ModelSpec) -> str:
    """The data sources that fit ``spec``'s task, as the fix in a mismatch error."""
    return _FITTING_DATA.get(spec.task, "a .pt / .npz file of its inputs x and targets y")


class _Part:
    """The part of a source's samples (or tokens) that ``split`` draws from."""

    def __init__(self, split: str, validation_fraction: float) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not 0.0 < validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must lie strictly between 0 and 1, got {validation_fraction!r}")
        self.split, self.fraction = split, validation_fraction
        self.label = "" if split == "all" else f" ({split} part)"

    def of(self, items: torch.Tensor) -> torch.Tensor:
        """``items`` (along dim 0) restricted to this part: the last ``fraction`` is the validation part."""
        if self.split == "all":
            return items
        cut = len(items) - max(1, round(len(items) * self.fraction))
        return items[:cut] if self.split == "train" else items[cut:]


def _batch_sizes(batch_size: int, n_batches: int, last_batch_size: int | None) -> list[int]:
    last = batch_size if last_batch_size is None else last_batch_size
    for what, value in (("batch_size", batch_size), ("n_batches", n_batches), ("last_batch_size", last)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return [batch_size] * (n_batches - 1) + [last]


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.is_floating_point():
        return t.to(dtype)
    if t.dtype == torch.bool:
        return t
    return t.long()


def _need(spec: ModelSpec, *keys: str) -> list:
    missing = [k for k in keys if k not in spec.data_shape]
    if missing:
        raise ValueError(f"model {spec.name!r} (task {spec.task!r}) has no {', '.join(missing)} in its data_shape")
    return [spec.data_shape[k] for k in keys]


# ---------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as normalised float64 images [N, 8, 8] and labels [N]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float64) / 16.0  # pixel values 0..16 -> [0, 1]
    images = (images - images.mean()) / images.std()
    return images, torch.tensor(digits.target, dtype=torch.long)


def _digits(spec: ModelSpec, n: int, gen: torch.Generator, part: _Part) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = _digits_dataset()
    if part.split != "all":  # the parts of one fixed shuffle of the images
        order = part.of(torch.randperm(len(images), generator=torch.Generator().manual_seed(0)))
        images, labels = images[order], labels[order]
    if n > len(images):
        raise ValueError(f"the digits data set{part.label} has {len(images)} images; {n} are needed: {_FEWER_SAMPLES}")
    idx = torch.randperm(len(images), generator=gen)[:n]
    images, labels = images[idx], labels[idx]

    if spec.task == "vector":
        (in_features, num_classes) = _need(spec, "in_features", "num_classes")
        if in_features != 64:
            raise ValueError(f"digits gives 64 features (8x8 pixels); model {spec.name!r} takes "
                             f"in_features={in_features}")
        _check_classes(spec, num_classes)
        return images.reshape(n, 64), labels
    if spec.task == "image":
        channels, size, num_classes = _need(spec, "channels", "image_size", "num_classes")
        _check_classes(spec, num_classes)
        x = images.unsqueeze(1)  # [n, 1, 8, 8]
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x.repeat(1, channels, 1, 1), labels
    raise ValueError(
        f"digits is image data; model {spec.name!r} has task {spec.task!r}, which takes {_fitting_data(spec)}"
    )


def _check_classes(spec: ModelSpec, num_classes: int) -> None:
    if num_classes < 10:
        raise ValueError(f"digits has 10 classes; model {spec.name!r} has num_classes={num_classes}")


# ---------------------------------------------------------------- text


@functools.lru_cache(maxsize=1)
def _bundled_text() -> torch.Tensor:
    """Byte-level tokens of Python's bundled pydoc topics (about 465k bytes of English)."""
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    return _bytes_to_tokens(text.encode("utf-8"))


def _bytes_to_tokens(data: bytes) -> torch.Tensor:
    if not data:  # torch.frombuffer refuses an empty buffer; the caller says how many bytes it needs
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _text_windows(
    spec: ModelSpec, tokens: torch.Tensor, n: int, gen: torch.Generator, what: str, random_offsets: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows of byte tokens: at seeded random offsets, or consecutive from the start."""
    _check_text_model(spec, what)
    vocab_size, context = _need(spec, "vocab_size", "context")
    masked = spec.task == "masked-text"
    byte_ids = vocab_size - 1 if masked else vocab_size  # the [MASK] id is vocab_size - 1
    if byte_ids < 2:
        raise ValueError(f"byte-level text needs vocab_size >= {3 if masked else 2}; "
                         f"model {spec.name!r} has {vocab_size}")
    if byte_ids < 256:
        _warn_folded_bytes(spec.name, vocab_size, byte_ids, masked)
        tokens = tokens % byte_ids

    length = context if masked else context + 1  # next-token targets need one token more
    needed = length if random_offsets else n * context + (length - context)
    if len(tokens) < needed:
        raise ValueError(
            f"{what} has {len(tokens)} bytes; {needed} are needed for {n} windows of {context}: {_FEWER_SAMPLES}"
        )
    if random_offsets:
        starts = torch.randint(0, len(tokens) - length + 1, (n,), generator=gen)
    else:
        starts = torch.arange(n) * context
    windows = tokens[starts[:, None] + torch.arange(length)]
    if masked:
        return _mask_tokens(windows, vocab_size - 1, gen)
    return windows[:, :-1], windows[:, 1:]


@functools.lru_cache(maxsize=None)
def _warn_folded_bytes(name: str, vocab_size: int, byte_ids: int, masked: bool) -> None:
    """Warn once per model and vocabulary that byte tokens are folded into a small vocabulary."""
    warnings.warn(
        f"model {name!r} has vocab_size {vocab_size}{' (one id is [MASK])' if masked else ''}, fewer ids than the 256 "
        f"byte values of the text: byte b is token b mod {byte_ids}. Set vocab_size >= {257 if masked else 256} "
        "for one token per byte", stacklevel=4,
    )


def _check_text_model(spec: ModelSpec, what: str) -> None:
    """Refuse text data (``what``) for a model that does not take token ids, naming the data it takes."""
    if spec.task not in TEXT_TASKS:
        raise ValueError(
            f"{what} is text data; model {spec.name!r} has task {spec.task!r}, which takes {_fitting_data(spec)}"
        )


def _mask_tokens(tokens: torch.Tensor, mask_id: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked-LM pairs: in each row the same number (15%, at least 1) of seeded random positions is
    replaced by ``mask_id`` in the inputs; targets hold the original id there and IGNORE_INDEX elsewhere."""
    n, T = tokens.shape
    k = max(1, round(MASK_FRACTION * T))
    chosen = torch.rand(n, T, generator=gen).argsort(dim=1)[:, :k]
    masked = torch.zeros(n, T, dtype=torch.bool).scatter(1, chosen, True)
    return tokens.masked_fill(masked, mask_id), tokens.masked_fill(~masked, IGNORE_INDEX)


# ---------------------------------------------------------------- synthetic


def _synthetic(spec: ModelSpec, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.task == "image":
        channels, size, num_classes = _need(spec, "channels", "image_size", "num_classes")
        x = torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, num_classes, (n,), generator=gen)
    if spec.task == "vector":
        in_features, num_classes = _need(spec, "in_features", "num_classes")
        x = torch.randn(n, in_features, generator=gen, dtype=torch.float64)
        return x, torch.randint(0, num_classes, (n,), generator=gen)
    if spec.task == "text":
        vocab_size, context = _need(spec, "vocab_size", "context")
        seq = torch.randint(0, vocab_size, (n, context + 1), generator=gen)
        return seq[:, :-1], seq[:, 1:]
    if spec.task == "masked-text":
        vocab_size, context = _need(spec, "vocab_size", "context")
        if vocab_size < 2:
            raise ValueError(f"masked-LM data needs vocab_size >= 2 (one id is [MASK]); model {spec.name!r} has "
                             f"{vocab_size}")
        tokens = torch.randint(0, vocab_size - 1, (n, context), generator=gen)
        return _mask_tokens(tokens, vocab_size - 1, gen)
    raise ValueError(f"synthetic data does not know the shapes of task {spec.task!r} (model {spec.name!r}); pass a "
                     "data file")


# ---------------------------------------------------------------- files


def _from_file(
    spec: ModelSpec, path: Path, n: int, gen: torch.Generator, part: _Part
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, y, attention mask or None) of ``n`` samples of a data file."""
    if path.suffix.lower() == ".txt":
        x, y = _text_windows(spec, part.of(_bytes_to_tokens(path.read_bytes())), n, gen, f"file {path}{part.label}",
                             random_offsets=False)
        return x, y, None
    x, y, mask = (None if t is None else part.of(t) for t in _load_samples(path))
    if len(x) < n:
        raise ValueError(
            f"{path}{part.label} holds {len(x)} samples; {n} are needed: {_FEWER_SAMPLES}, or pass a larger file"
        )
    x, y = x[:n], y[:n]
    _check_file_shapes(spec, x, y, path)
    if mask is None:
        return x, y, None
    mask = mask[:n]
    if not spec.keyword_inputs:
        raise ValueError(f"{path} holds an attention_mask, but model {spec.name!r} takes one tensor of inputs and no "
                         "mask: drop attention_mask from the file, or give the model keyword inputs "
                         "(a ModelSpec with keyword_inputs=True, as hf: models have)")
    if mask.shape != x.shape or not ((mask == 0) | (mask == 1)).all():
        raise ValueError(f"{path}: attention_mask must hold 0 (padding) and 1 (token) in x's shape {tuple(x.shape)}; "
                         f"got shape {tuple(mask.shape)}")
    return x, y.long().masked_fill(mask == 0, IGNORE_INDEX), mask


def _load_samples(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The samples (x, y, attention mask or None) of a .pt or .npz file: one sample per entry along dim 0."""
    x, y, mask = _load_pt(path) if path.suffix.lower() == ".pt" else _load_npz(path)
    if x.dim() == 0 or y.dim() == 0:
        raise ValueError(
            f"{path}: x and y must have a leading sample dimension; got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if len(x) != len(y):
        raise ValueError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    return x, y, mask


def _first_sentence(err: BaseException) -> str:
    """The first sentence of an exception's message (torch's and numpy's run on for paragraphs), or its type."""
    text = str(err).strip()
    return text.split(". ")[0].splitlines()[0].rstrip(".") if text else type(err).__name__


def _tensor(value: object, path: Path, name: str) -> torch.Tensor:
    """``value`` (array, tensor or nested list of numbers) as a tensor, or an error naming the file and array."""
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{path}: {name} is not numeric (torch: {_first_sentence(err)}); save numbers (tensors or arrays) as x "
            "and y"
        ) from err


def _load_pt(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"{path} is not a file of tensors written by torch.save (torch: {_first_sentence(err)}): save "
            "{'x': inputs, 'y': targets} with torch.save, or pass an .npz or .txt file"
        ) from err
    if isinstance(obj, dict):
        missing = {"x", "y"} - set(obj)
        if missing:
            raise ValueError(f"{path}: the saved dict has no {', '.join(sorted(missing))} "
                             f"(keys: {', '.join(map(str, obj))})")
        mask = _tensor(obj["attention_mask"], path, "attention_mask") if "attention_mask" in obj else None
        return _tensor(obj["x"], path, "x"), _tensor(obj["y"], path, "y"), mask
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in obj):
        xs, ys = [_tensor(p[0], path, "x") for p in obj], [_tensor(p[1], path, "y") for p in obj]
        if any(t.dim() == 0 for t in xs + ys):
            raise ValueError(f"{path}: each (x, y) pair must be a batch with a leading batch dimension")
        return torch.cat(xs), torch.cat(ys), None
    raise ValueError(f"{path}: expected a dict with 'x' and 'y' tensors or a list of (x, y) batches")


def _load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    import numpy as np

    fix = "write one with numpy.savez(path, x=inputs, y=targets), or pass a .pt or .txt file"
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is not an .npz archive of numeric arrays (numpy: {_first_sentence(err)}): {fix}"
        ) from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array (an .npy file), not an .npz archive of arrays x and y: {fix}")
    with archive:
        missing = {"x", "y"} - set(archive.files)
        if missing:
            raise ValueError(f"{path}: no array {', '.join(sorted(missing))} (arrays: {', '.join(archive.files)})")
        try:
            x, y = archive["x"], archive["y"]
            mask = archive["attention_mask"] if "attention_mask" in archive.files else None
        except ValueError as err:  # object arrays need pickle, which a data file may not run
            raise ValueError(f"{path}: x and y must be numeric arrays (numpy: {_first_sentence(err)}): {fix}") from err
    return _tensor(x, path, "x"), _tensor(y, path, "y"), None if mask is None else _tensor(mask, path, "attention_mask")


def _check_file_shapes(spec: ModelSpec, x: torch.Tensor, y: torch.Tensor, path: Path) -> None:
    """Catch data that does not fit the model here, with a message, rather than deep in a forward."""
    if spec.task == "image":
        channels, size, _ = _need(spec, "channels", "image_size", "num_classes")
        expected = (channels, size, size)
        if tuple(x.shape[1:]) != expected:
            raise ValueError(f"{path}: images of shape {tuple(x.shape[1:])}; model {spec.name!r} takes {expected}")
    elif spec.task == "vector":
        (in_features,) = _need(spec, "in_features")
        if x[0].numel() != in_features:
            raise ValueError(f"{path}: samples of {x[0].numel()} features; model {spec.name!r} takes {in_features}")
    elif spec.task in TEXT_TASKS:
        vocab_size, context = _need(spec, "vocab_size", "context")
        if x.dim() != 2 or x.is_floating_point() or x.shape[1] > context or y.shape != x.shape:
            raise ValueError(
                f"{path}: text data must be integer token ids x and y of one shape [N, T] with T <= {context}; "
                f"got x {tuple(x.shape)} {x.dtype}, y {tuple(y.shape)}"
            )
        if x.min() < 0 or x.max() >= vocab_size:
            raise ValueError(f"{path}: token ids must lie in [0, {vocab_size}); got [{x.min()}, {x.max()}]")
