"""Saving and loading models as safetensors files (no pickle: loading runs no code).

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
library version that saved it, in/out features, and optionally the feature
and target names and the standardisation the features had in training
(``input_mean``, ``input_scale``). The weight and bias always apply to raw
feature values: a model trained on standardised features is saved with the
standardisation folded in (see ``fold_standardization``), and the means and
scales are kept as a record of it.

Saving writes a temporary file beside the target, flushes it to disk and
renames it over the target (``os.replace``, atomic on POSIX and Windows), so
an interrupted save leaves the previous file, never a truncated one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .module import FusedLinearRegressor

FORMAT = "linreg-fused"
FORMAT_VERSION = 1


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
    out_features, in_features = weight.shape
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "library_version": __version__,
            "in_features": str(in_features), "out_features": str(out_features), "bias": str(bias is not None)}
    for key, values, size in (("feature_names", feature_names, in_features),
                              ("target_names", target_names, out_features)):
        if values is not None:
            values = [str(v) for v in values]
            if len(values) != size:
                raise ValueError(f"{key} has {len(values)} names for {size} {key.split('_')[0]}s")
            meta[key] = json.dumps(values)
    if (input_mean is None) != (input_scale is None):
        raise ValueError("give both input_mean and input_scale, or neither")
    if input_mean is not None:
        for key, values in (("input_mean", input_mean), ("input_scale", input_scale)):
            values = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
            if len(values) != in_features:
                raise ValueError(f"{key} has {len(values)} values for {in_features} features")
            if key == "input_scale" and not all(v > 0 and v != float("inf") for v in values):
                raise ValueError("input_scale must be positive and finite")
            meta[key] = json.dumps(values)  # repr of each float: round-trips exactly

    from safetensors.torch import save as to_bytes

    tensors = {"weight": weight.detach().cpu().contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().cpu().contiguous()
    _write_atomically(os.fspath(path), to_bytes(tensors, metadata=meta))


def load(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    backend: str = "auto",
    input_precision: str = "auto",
) -> FusedLinearRegressor:
    """A FusedLinearRegressor with the weights of the file at ``path``, on ``device``."""
    from .module import FusedLinearRegressor

    info, tensors = _read(path)
    model = FusedLinearRegressor(info.in_features, info.out_features, info.bias, device=device,
                                 dtype=info.dtype, backend=backend, input_precision=input_precision)
    model.load_state_dict(tensors)
    return model


def read_info(path: str | os.PathLike) -> ModelInfo:
    """The metadata of the model file at ``path`` (its tensors are checked, not kept)."""
    return _read(path)[0]


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


def _write_atomically(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _read(path) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a safetensors model file ({err})") from None

    if set(tensors) not in ({"weight"}, {"weight", "bias"}):
        raise ModelFileError(f"{path}: expected the tensors 'weight' and 'bias' of a linear model, "
                             f"found {sorted(tensors)}")
    weight, bias = tensors["weight"], tensors.get("bias")
    if weight.ndim != 2 or (bias is not None and bias.shape != (weight.shape[0],)):
        raise ModelFileError(f"{path}: weight must be (out, in) and bias (out,), got {tuple(weight.shape)} "
                             f"and {None if bias is None else tuple(bias.shape)}")
    if bias is not None and bias.dtype != weight.dtype:
        raise ModelFileError(f"{path}: weight is {weight.dtype} but bias is {bias.dtype}")
    out_features, in_features = weight.shape

    if meta.get("format", FORMAT) != FORMAT:
        raise ModelFileError(f"{path}: a {meta['format']!r} file, not a {FORMAT} model")
    version = int(meta.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise ModelFileError(f"{path}: saved in model format {version} by linreg-fused "
                             f"{meta.get('library_version')}; this version reads format {FORMAT_VERSION}: upgrade")
    for key, size in (("in_features", in_features), ("out_features", out_features)):
        if key in meta and int(meta[key]) != size:
            raise ModelFileError(f"{path}: metadata says {key}={meta[key]} but the weight is {tuple(weight.shape)}")
    fields = {}
    for key, size in (("feature_names", in_features), ("target_names", out_features),
                      ("input_mean", in_features), ("input_scale", in_features)):
        if key in meta:
            values = json.loads(meta[key])
            if not isinstance(values, list) or len(values) != size:
                raise ModelFileError(f"{path}: metadata {key} must list {size} values, got {meta[key]!r}")
            fields[key] = values
    info = ModelInfo(in_features, out_features, bias is not None, weight.dtype,
                     library_version=meta.get("library_version"), **fields)
    return info, tensors
