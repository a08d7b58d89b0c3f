"""Model files: safetensors, no pickle (loading runs no code). docs/model-files.md has the format.

    model.save("model.safetensors", feature_names=["temp", "rainfall", "humidity"],
               target_names=["apples", "oranges"])
    model = FusedLinearRegressor.load("model.safetensors")
    info = read_info("model.safetensors")            # names, standardisation, sizes, version

The file holds exactly nn.Linear's state_dict (``weight`` (out, in) and,
when the model has one, ``bias`` (out,)) in the model's dtype, so plain
PyTorch reads it too::

    from safetensors.torch import load_file
    linear = nn.Linear(3, 2)
    linear.load_state_dict(load_file("model.safetensors"))

Metadata (safetensors' string header): the format name and version, the
library version that saved it, in/out features, a SHA-256 of the tensors'
bytes (``tensor_sha256``, checked on every read: a changed byte is an
error, not a slightly different model), and optionally the feature and
target names and the standardisation the features had in training
(``input_mean``, ``input_scale``). The weight and bias always apply to raw
feature values: a model trained on standardised features is saved with the
standardisation folded in (see ``fold_standardization``), and the means and
scales are kept as a record of it.

Saving writes a temporary file beside the target, flushes it to disk and
renames it over the target (``os.replace``, atomic on POSIX and Windows), so
an interrupted save leaves the previous file, never a truncated one. A
symlink is followed (the file it points to is replaced, the link kept) and
an existing file keeps its permission bits.

This module knows nothing of FusedLinearRegressor: it writes any module with
``weight`` and ``bias``, and ``read`` hands back the checked tensors, from
which ``FusedLinearRegressor.load`` builds the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from .replacing import replacing

FORMAT = "linreg-fused"
FORMAT_VERSION = 1
CHECKSUM = "tensor_sha256"
# The dtypes a model can have; an integer "weight" is some other kind of file.
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ModelFileError(ValueError):
    """A file that is not a model this library can load; the message says why."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model file records besides its tensors."""

    in_features: int
    out_features: int
    bias: bool
    dtype: torch.dtype
    feature_names: list[str] | None = None
    target_names: list[str] | None = None
    input_mean: list[float] | None = None
    input_scale: list[float] | None = None
    library_version: str | None = None  # None for a plain weight/bias file saved by other code
    checksum: str | None = None  # the verified SHA-256; None for files saved without one


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    feature_names: Sequence[str] | None = None,
    target_names: Sequence[str] | None = None,
    input_mean: Sequence[float] | torch.Tensor | None = None,
    input_scale: Sequence[float] | torch.Tensor | None = None,
) -> None:
    """Write ``model`` (a FusedLinearRegressor or an nn.Linear) to ``path`` atomically.

    feature_names: in_features names; target_names: out_features names;
    input_mean, input_scale: the per-feature standardisation used in
    training, recorded as metadata (the weights must already apply to raw
    features: see fold_standardization).
    """
    from . import __version__

    weight, bias = model.weight, model.bias
    if weight.dtype not in DTYPES:
        raise TypeError(f"a model file holds floating-point weights {DTYPES}, got {weight.dtype}")
    out_features, in_features = weight.shape
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "library_version": __version__,
            "in_features": str(in_features), "out_features": str(out_features), "bias": str(bias is not None)}
    for key, values, size in (("feature_names", feature_names, in_features),
                              ("target_names", target_names, out_features)):
        if values is not None:
            values = [str(v) for v in values]
            if len(values) != size:
                raise ValueError(f"{key} has {len(values)} names for {size} {key.split('_')[0]}s")
            if _twice(values) is not None:  # which column would that feature read?
                raise ValueError(f"{key} names {_twice(values)!r} twice")
            meta[key] = json.dumps(values)
    if (input_mean is None) != (input_scale is None):
        raise ValueError("give both input_mean and input_scale, or neither")
    if input_mean is not None:
        mean, scale = (v.tolist() if isinstance(v, torch.Tensor) else list(v) for v in (input_mean, input_scale))
        for key, values in _checked_standardization(mean, scale, in_features).items():
            meta[key] = json.dumps(values)  # repr of each float: round-trips exactly

    from safetensors.torch import save as to_bytes

    tensors = {"weight": weight.detach().cpu().contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().cpu().contiguous()
    meta[CHECKSUM] = _digest(tensors)
    _write_atomically(os.fspath(path), to_bytes(tensors, metadata=meta))


def read_safetensors(path: str | os.PathLike) -> tuple[str, dict[str, str], dict[str, torch.Tensor]]:
    """(path, metadata, tensors) of a safetensors file, unchecked; ModelFileError where ``path`` is
    a directory, missing, or not a safetensors file (of either kind of model)."""
    from safetensors import SafetensorError, safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ModelFileError(f"{path}: a directory, not a model file")
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a safetensors model file ({err})") from None
    return path, meta, tensors


def read(path: str | os.PathLike) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    """(the metadata, the state_dict {"weight", "bias"}) of the model file at ``path``, checked:
    any file that is not a model (malformed metadata, a changed byte) raises ModelFileError."""
    path, meta, tensors = read_safetensors(path)

    if meta.get("format", FORMAT) != FORMAT:  # before the tensors: a grouped model's are (G, O, D)
        grouped = meta["format"] == "linreg-fused-grouped"
        hint = " (grouped models load with GroupedLinearRegressor.load)" if grouped else ""
        raise ModelFileError(f"{path}: a {meta['format'][:80]!r} file, not a {FORMAT} model{hint}")
    if set(tensors) not in ({"weight"}, {"weight", "bias"}):
        raise ModelFileError(f"{path}: expected the tensors 'weight' and 'bias' of a linear model, "
                             f"found {sorted(tensors)}")
    weight, bias = tensors["weight"], tensors.get("bias")
    if weight.ndim != 2 or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ModelFileError(f"{path}: weight must be (out, in) and bias (out,), got {tuple(weight.shape)} "
                             f"and {None if bias is None else tuple(bias.shape)}")
    if weight.dtype not in DTYPES:
        raise ModelFileError(f"{path}: weight is {weight.dtype}; a model's weights are floating point "
                             f"(float16, bfloat16, float32 or float64)")
    if bias is not None and bias.dtype != weight.dtype:
        raise ModelFileError(f"{path}: weight is {weight.dtype} but bias is {bias.dtype}")
    try:
        fields = _checked_metadata(meta, *weight.shape, bias is not None)
    except ValueError as err:
        raise ModelFileError(f"{path}: {err}") from None
    if fields.get("checksum") is not None and fields["checksum"] != _digest(tensors):
        raise ModelFileError(f"{path}: the tensors' bytes do not match the checksum saved with them: the file "
                             f"was changed or damaged after it was written")
    info = ModelInfo(weight.shape[1], weight.shape[0], bias is not None, weight.dtype, **fields)
    return info, tensors


def read_info(path: str | os.PathLike) -> ModelInfo:
    """The metadata of the model file at ``path`` (its tensors are checked, not kept)."""
    return read(path)[0]


def fold_standardization(
    weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights for raw features from weights trained on standardised ones.

    A model y = W·((x − mean) / scale) + b is y = W'·x + b' with
    W' = W / scale and b' = b − W'·mean (computed in float64, returned in
    weight's dtype). weight: (O, D); bias: (O,) or None; mean, scale: (D,).
    """
    w64 = weight.detach().double() / scale.to(weight.device, torch.float64)
    b64 = -(w64 @ mean.to(weight.device, torch.float64))
    if bias is not None:
        b64 = b64 + bias.detach().double()
    return w64.to(weight.dtype), b64.to(weight.dtype)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of weight's bytes then bias's, as safetensors stores them (row-major, little-endian)."""
    h = hashlib.sha256()
    for key in ("weight", "bias"):
        if key in tensors:
            t = tensors[key].detach().cpu().contiguous()
            raw = t.reshape(-1).view(torch.uint8).reshape(t.numel(), t.element_size())
            if sys.byteorder == "big":
                raw = raw.flip(1)
            h.update(raw.numpy().tobytes())
    return h.hexdigest()


def _twice(names: list[str]) -> str | None:
    """The first name that appears twice, or None."""
    seen: set[str] = set()
    return next((n for n in names if n in seen or seen.add(n)), None)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _checked_standardization(mean: list, scale: list, in_features: int) -> dict[str, list[float]]:
    """{"input_mean": ..., "input_scale": ...} as floats, or ValueError: saving and loading share these rules."""
    out = {}
    for key, values in (("input_mean", mean), ("input_scale", scale)):
        if len(values) != in_features:
            raise ValueError(f"{key} has {len(values)} values for {in_features} features")
        bad = [v for v in values if not (_is_number(v) and math.isfinite(v))]
        if bad:
            raise ValueError(f"{key} must hold finite numbers, got {bad[0]!r}")
        out[key] = [float(v) for v in values]
    if not all(v > 0 for v in out["input_scale"]):
        raise ValueError("input_scale must be positive and finite")
    return out


def _checked_metadata(meta: dict[str, str], out_features: int, in_features: int, has_bias: bool) -> dict:
    """The ModelInfo fields the metadata holds, each checked; ValueError names the first bad one."""
    if meta.get("format", FORMAT) != FORMAT:
        raise ValueError(f"a {meta['format']!r} file, not a {FORMAT} model")
    ints = {}
    for key in ("format_version", "in_features", "out_features"):
        if key in meta:
            if not re.fullmatch(r"[0-9]{1,9}", meta[key]):
                raise ValueError(f"metadata {key} must be a whole number, got {meta[key]!r}")
            ints[key] = int(meta[key])
    version = ints.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"saved in model format {version} by linreg-fused {meta.get('library_version')}; this "
                         f"version reads format {FORMAT_VERSION}: upgrade")
    for key, size in (("in_features", in_features), ("out_features", out_features)):
        if ints.get(key, size) != size:
            raise ValueError(f"metadata says {key}={meta[key]} but the weight is ({out_features}, {in_features})")
    if "bias" in meta and meta["bias"] != str(has_bias):
        raise ValueError(f"metadata says bias={meta['bias']!r} but the file {'has' if has_bias else 'has no'} bias")
    fields: dict[str, Any] = {"library_version": meta.get("library_version")}
    lists = {}
    for key, size in (("feature_names", in_features), ("target_names", out_features),
                      ("input_mean", in_features), ("input_scale", in_features)):
        if key in meta:
            try:
                values = json.loads(meta[key])
            except ValueError:
                raise ValueError(f"metadata {key} is not JSON: {meta[key][:80]!r}") from None
            if not isinstance(values, list) or len(values) != size:
                raise ValueError(f"metadata {key} must list {size} values, got {meta[key][:80]!r}")
            lists[key] = values
    for key in ("feature_names", "target_names"):
        if key in lists:
            if not all(isinstance(v, str) for v in lists[key]):
                raise ValueError(f"metadata {key} must list names (strings), got {meta[key][:80]!r}")
            if _twice(lists[key]) is not None:
                raise ValueError(f"metadata {key} names {_twice(lists[key])[:80]!r} twice")
            fields[key] = lists[key]
    if ("input_mean" in lists) != ("input_scale" in lists):
        raise ValueError("metadata has one of input_mean and input_scale but not the other")
    if "input_mean" in lists:
        fields.update(_checked_standardization(lists["input_mean"], lists["input_scale"], in_features))
    if CHECKSUM in meta:
        if not re.fullmatch(r"[0-9a-f]{64}", meta[CHECKSUM]):
            raise ValueError(f"metadata {CHECKSUM} must be 64 hexadecimal digits, got {meta[CHECKSUM][:80]!r}")
        fields["checksum"] = meta[CHECKSUM]
    return fields


def _write_atomically(path: str, data: bytes) -> None:
    with replacing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
