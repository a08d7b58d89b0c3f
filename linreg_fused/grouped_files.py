"""GroupedLinearRegressor files: safetensors (no pickle), written as single-model files are
(linreg_fused.serialization: atomically, through symlinks, keeping an existing file's mode).

The file holds the model's state_dict (``weight`` (G, O, D) and, when the model has
one, ``bias`` (G, O)) in its dtype, and a string header: the format name and version,
the library version that saved it, n_groups, in_features, out_features, bias, and a
SHA-256 of the tensors' bytes (``tensor_sha256``), checked on every read.
"""

from __future__ import annotations

import os
import re

import torch

from .serialization import CHECKSUM, DTYPES, ModelFileError, _digest, _write_atomically, read_safetensors


def save_grouped(model, path: str | os.PathLike, fmt: str, version: int) -> None:
    from safetensors.torch import save as to_bytes

    from . import __version__

    g, o, d = model.weight.shape
    meta = {"format": fmt, "format_version": str(version), "library_version": __version__, "n_groups": str(g),
            "in_features": str(d), "out_features": str(o), "bias": str(model.bias is not None)}
    tensors = {"weight": model.weight.detach().cpu().contiguous()}
    if model.bias is not None:
        tensors["bias"] = model.bias.detach().cpu().contiguous()
    meta[CHECKSUM] = _digest(tensors)
    _write_atomically(os.fspath(path), to_bytes(tensors, metadata=meta))


def read_grouped(path: str | os.PathLike, fmt: str, version: int) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, has_bias) of a grouped model file; ModelFileError says what is wrong otherwise."""
    path, meta, tensors = read_safetensors(path)
    if meta.get("format") != fmt:
        raise ModelFileError(f"{path}: a {meta.get('format', 'plain safetensors')!r} file, not a {fmt} model "
                             f"(single models load with FusedLinearRegressor.load)")
    ints = {}
    for key in ("format_version", "n_groups", "in_features", "out_features"):
        if key in meta:
            if not re.fullmatch(r"[0-9]{1,9}", meta[key]):
                raise ModelFileError(f"{path}: metadata {key} must be a whole number, got {meta[key][:80]!r}")
            ints[key] = int(meta[key])
    if ints.get("format_version", version) > version:
        raise ModelFileError(f"{path}: saved in {fmt} format {meta['format_version']}; this version reads "
                             f"format {version}: upgrade")
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if set(tensors) - {"weight", "bias"} or weight is None or weight.dim() != 3:
        raise ModelFileError(f"{path}: expected 'weight' (G, O, D) and optionally 'bias' (G, O), found "
                             f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    if weight.dtype not in DTYPES:
        raise ModelFileError(f"{path}: weight is {weight.dtype}; a model's weights are floating point "
                             f"(float16, bfloat16, float32 or float64)")
    if bias is not None and (bias.shape != weight.shape[:2] or bias.dtype != weight.dtype):
        raise ModelFileError(f"{path}: bias {tuple(bias.shape)} {bias.dtype} does not match weight "
                             f"{tuple(weight.shape)} {weight.dtype}")
    g, o, d = weight.shape
    for key, size in (("n_groups", g), ("in_features", d), ("out_features", o)):
        if ints.get(key, size) != size:
            raise ModelFileError(f"{path}: metadata says {key}={meta[key]} but the weight is {tuple(weight.shape)}")
    if "bias" in meta and meta["bias"] != str(bias is not None):
        raise ModelFileError(f"{path}: metadata says bias={meta['bias'][:20]!r} but the file "
                             f"{'has' if bias is not None else 'has no'} bias")
    if CHECKSUM in meta and meta[CHECKSUM] != _digest(tensors):
        raise ModelFileError(f"{path}: the tensors' bytes do not match the checksum saved with them: the file "
                             f"was changed or damaged after it was written")
    if min(g, o, d) == 0:
        raise ModelFileError(f"{path}: an empty model (weight {tuple(weight.shape)})")
    return tensors, bias is not None
