"""GroupedLinearRegressor files: safetensors (no pickle), written atomically.

The file holds the model's state_dict (``weight`` (G, O, D) and, when the model has
one, ``bias`` (G, O)) in its dtype, and a string header: the format name and version,
the library version that saved it, and n_groups, in_features, out_features, bias.
"""

from __future__ import annotations

import os
import tempfile

import torch

from .serialization import ModelFileError


def save_grouped(model, path: str | os.PathLike, fmt: str, version: int) -> None:
    from safetensors.torch import save as to_bytes

    from . import __version__

    g, o, d = model.weight.shape
    meta = {"format": fmt, "format_version": str(version), "library_version": __version__, "n_groups": str(g),
            "in_features": str(d), "out_features": str(o), "bias": str(model.bias is not None)}
    tensors = {"weight": model.weight.detach().cpu().contiguous()}
    if model.bias is not None:
        tensors["bias"] = model.bias.detach().cpu().contiguous()
    data = to_bytes(tensors, metadata=meta)
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:  # a temporary file beside the target, renamed over it: never a truncated file
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_grouped(path: str | os.PathLike, fmt: str, version: int) -> tuple[dict[str, torch.Tensor], bool]:
    """(tensors, has_bias) of a grouped model file; ModelFileError says what is wrong otherwise."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a safetensors model file ({err})") from None
    if meta.get("format") != fmt:
        raise ModelFileError(f"{path}: a {meta.get('format', 'plain safetensors')!r} file, not a {fmt} model "
                             f"(single models load with FusedLinearRegressor.load)")
    if int(meta.get("format_version", version)) > version:
        raise ModelFileError(f"{path}: saved in {fmt} format {meta['format_version']}; this version reads "
                             f"format {version}: upgrade")
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if set(tensors) - {"weight", "bias"} or weight is None or weight.dim() != 3:
        raise ModelFileError(f"{path}: expected 'weight' (G, O, D) and optionally 'bias' (G, O), found "
                             f"{ {k: tuple(v.shape) for k, v in tensors.items()} }")
    if bias is not None and (bias.shape != weight.shape[:2] or bias.dtype != weight.dtype):
        raise ModelFileError(f"{path}: bias {tuple(bias.shape)} {bias.dtype} does not match weight "
                             f"{tuple(weight.shape)} {weight.dtype}")
    return tensors, bias is not None
