"""Rows in, as tensors: checks of (x, t) pairs, chunks of arrays or memory-mapped
files, and the double-buffered pinned upload of host chunks to a GPU (the input
side of LinearStats.from_batches)."""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Iterable, Iterator

import numpy as np
import torch


def check_rows(x: Any, t: Any, *, allow_no_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, t) as 2-D (N, D), (N, O) views, checked; names the problem otherwise. N = 0 is an
    error unless ``allow_no_rows`` (a chunk of a stream); D = 0 or O = 0 always is."""
    for name, v in (("x", x), ("t", t)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (or a NumPy array in from_batches), got {type(v).__name__}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if v.dim() < 1:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if x.dtype != t.dtype:
        raise TypeError(f"x is {x.dtype} but t is {t.dtype}; they must match")
    if x.device != t.device:
        raise ValueError(f"x is on {x.device} but t is on {t.device}; move them to one device")
    if x.shape[:-1] != t.shape[:-1]:
        if t.shape == x.shape[:-1]:  # (N,) beside (N, D): one target, its dimension left out
            raise ValueError(f"t has shape {tuple(t.shape)}: one target per row needs shape {(*t.shape, 1)} "
                             f"(t[..., None]); x has shape {tuple(x.shape)}")
        raise ValueError(f"x has shape {tuple(x.shape)} and t {tuple(t.shape)}: their leading dimensions differ")
    x2, t2 = x.reshape(-1, x.shape[-1]), t.reshape(-1, t.shape[-1])
    if (x2.shape[0] == 0 and not allow_no_rows) or x2.shape[1] == 0 or t2.shape[1] == 0:
        raise ValueError(f"empty data: x has shape {tuple(x.shape)}, t {tuple(t.shape)}")
    return x2, t2


def _as_tensor(v: Any) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        if not v.flags.c_contiguous:
            v = np.ascontiguousarray(v)
        with warnings.catch_warnings():  # read-only (memory-mapped) arrays are only ever read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            return torch.from_numpy(v)  # no copy: a memory-mapped chunk is read when it is used
    raise TypeError(f"a chunk must be a (x, t) pair of tensors or NumPy arrays, got {type(v).__name__}")


def row_chunks(x: Any, t: Any, chunk_rows: int) -> Iterator[tuple[Any, Any]]:
    """(x[i:i+chunk_rows], t[i:i+chunk_rows]) for arrays, memory-mapped arrays or tensors."""
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, numbers.Integral) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    chunk_rows = int(chunk_rows)  # NumPy's too
    if len(x) != len(t):
        raise ValueError(f"x has {len(x)} rows but t has {len(t)}")
    for start in range(0, len(x), chunk_rows):
        yield x[start : start + chunk_rows], t[start : start + chunk_rows]


def staged(batches: Iterable[tuple[Any, Any]], device: torch.device | None) -> Iterator[tuple[torch.Tensor, ...]]:
    """The chunks as tensors on ``device``; on CUDA through double-buffered pinned memory."""
    if device is not None and device.type == "cuda":
        yield from _PinnedUploader(device).stream(batches)
        return
    for x, t in _unpack(batches):
        yield (x, t) if device is None else (x.to(device), t.to(device))


def _unpack(batches):
    for chunk in batches:
        try:
            x, t = chunk
        except (TypeError, ValueError):
            raise TypeError(f"each chunk must be an (x, t) pair, got {type(chunk).__name__}") from None
        yield _as_tensor(x), _as_tensor(t)


class _PinnedUploader:
    """Host chunks -> CUDA through two pinned buffers, copied on a side stream.

    Chunk k is copied into pinned slot k % 2 (host memcpy), uploaded on the copy stream
    and handed to the caller, whose kernels run on the current stream; while they run,
    chunk k+1 is read into the other slot. Events order the reuse of each slot: the
    host waits for the upload that last read a pinned slot, the copy stream for the
    kernels that last read a device slot. Tensors already on the device pass through.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.slots: list[dict[str, Any]] = [{}, {}]

    def _buffers(self, slot: dict[str, Any], x: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
        """The slot's buffers, (re)allocated when a chunk is larger or shaped otherwise."""
        fits = ("host_x" in slot and x.shape[0] <= slot["host_x"].shape[0] and x.dtype == slot["host_x"].dtype
                and x.shape[1:] == slot["host_x"].shape[1:] and t.shape[1:] == slot["host_t"].shape[1:])
        if not fits:
            if "consumed" in slot:  # nothing may still read the buffers being replaced
                slot["copied"].synchronize()
                slot["consumed"].synchronize()
            slot.update(host_x=torch.empty(x.shape, dtype=x.dtype, pin_memory=True),
                        host_t=torch.empty(t.shape, dtype=t.dtype, pin_memory=True),
                        dev_x=torch.empty(x.shape, dtype=x.dtype, device=self.device),
                        dev_t=torch.empty(t.shape, dtype=t.dtype, device=self.device),
                        copied=torch.cuda.Event(), consumed=torch.cuda.Event())
        return slot

    def stream(self, batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        compute = torch.cuda.current_stream(self.device)
        for k, (x, t) in enumerate(_unpack(batches)):
            if x.device == self.device and t.device == self.device:
                yield x, t
                continue
            x, t = x.cpu(), t.cpu()
            slot = self._buffers(self.slots[k % 2], x, t)
            rows = x.shape[0]
            slot["copied"].synchronize()  # the upload that last read this pinned slot is done
            host_x, host_t = slot["host_x"][:rows], slot["host_t"][:rows]
            host_x.copy_(x)
            host_t.copy_(t)
            dev_x, dev_t = slot["dev_x"][:rows], slot["dev_t"][:rows]
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(slot["consumed"])  # kernels that last read this device slot
                dev_x.copy_(host_x, non_blocking=True)
                dev_t.copy_(host_t, non_blocking=True)
                slot["copied"].record(self.copy_stream)
            compute.wait_event(slot["copied"])
            yield dev_x, dev_t
            slot["consumed"].record(compute)
