"""fit's arguments and data: checked once, up front, before any work.

Hyper-parameters may be any ``numbers.Integral`` / ``numbers.Real`` (NumPy
scalars too, as scikit-learn's searches pass them), never bool. Tensor data
keeps its dtype (it must match the model's, as for ``train_step``); NumPy
arrays are converted to the model's dtype, with one warning when that
changes a value (float64 data for a float32 model); float32 data for a
float64 model is widened silently.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .fit_orders import device_generator
from .functional import REDUCTIONS, check_inputs, rows
from .optim import FusedSGD

@dataclass
class TensorSource:
    """Tensors on the model's device, shuffled and batched by fit."""

    x: torch.Tensor  # (N, D)
    t: torch.Tensor  # (N, O)
    batch_size: int  # in rows
    shuffle: bool | str  # True: DataLoader's order; "device": drawn on the device; False: storage order
    generator: torch.Generator | None
    global_rng: bool = False  # neither seed= nor generator= was given: the orders come from the global RNG
    # Rows per sample of data (n, ..., D): DataLoader draws and batches the n samples, each a block of rows.
    rows_per_sample: int = 1

    @property
    def n_rows(self) -> int:
        return self.x.shape[0]

    @property
    def full_batch(self) -> bool:
        """One step per epoch over every row: the row order cannot change the step, so none is drawn."""
        return self.batch_size >= self.n_rows

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)


@dataclass
class BatchSource:
    """An iterable of (xb, yb) batches that batches itself (e.g. a DataLoader)."""

    batches: Iterable

    @property
    def batches_per_epoch(self) -> int:
        """len(batches), or 1 where it has none (a DataLoader over an IterableDataset has __len__ and raises)."""
        try:
            return len(self.batches)
        except (TypeError, NotImplementedError):
            return 1


def _integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def positive_int(name: str, v, none_ok: bool = False) -> int | None:
    """``v`` as an int >= 1 (any Integral but bool), or None where allowed."""
    if v is None and none_ok:
        return None
    if not _integer(v) or v < 1:
        raise ValueError(f"{name} must be a positive integer{' or None' if none_ok else ''}, got {v!r}")
    return int(v)


def check_options(epochs, log_every, reduction, shuffle, seed, generator,
                  print_fn) -> tuple[int, int | None, int | None]:
    """(epochs, log_every, seed) as ints, after checking every option of fit that needs no data."""
    epochs = positive_int("epochs", epochs)
    log_every = positive_int("log_every", log_every, none_ok=True)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(shuffle, str) and shuffle != "device":
        raise ValueError(f"shuffle must be True (DataLoader's order), False or 'device', got {shuffle!r}")
    if seed is not None and generator is not None:
        raise ValueError("give either seed= or generator=, not both")
    if seed is not None and not _integer(seed):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if not callable(print_fn):
        raise TypeError("print_fn must be callable")
    return epochs, log_every, None if seed is None else int(seed)


_PLAIN_SGD: "weakref.WeakKeyDictionary[Any, tuple[tuple, FusedSGD]]" = weakref.WeakKeyDictionary()


def make_optimizer(model, optimizer, lr):
    """The optimizer fit steps: the one given, or FusedSGD(lr=lr). The latter has no state (no
    momentum) and no one else sees it, so a model fitted again with the same lr and parameters
    reuses it (making one costs more than the rest of a small fit's host work)."""
    if optimizer is None:
        if lr is None:
            raise ValueError("give an optimizer (e.g. FusedSGD(model.parameters(), lr=1e-5)) or lr=")
        if not isinstance(lr, torch.Tensor):
            if not isinstance(lr, numbers.Real) or isinstance(lr, (bool, np.bool_)):
                raise TypeError(f"lr must be a real number, got {type(lr).__name__}")
            lr = float(lr)
        else:  # a tensor may change in place: not kept
            return FusedSGD(model.parameters(), lr=lr, backend=model.backend)
        key = (lr, model.backend, *(id(p) for p in model.parameters()))
        kept = _PLAIN_SGD.get(model)
        if kept is None or kept[0] != key:
            kept = _PLAIN_SGD[model] = (key, FusedSGD(model.parameters(), lr=lr, backend=model.backend))
        return kept[1]
    if lr is not None:
        raise ValueError("give either optimizer= or lr=, not both")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer (e.g. FusedSGD), got {type(optimizer).__name__}")
    trained = [p for p in (model.weight, model.bias) if p is not None and p.requires_grad]
    if isinstance(optimizer, FusedSGD) and trained and all(optimizer.group_of(p) is None for p in trained):
        # train_step's error (FusedUpdate), on every path: one-launch and statistics runs trained nothing
        raise ValueError("the weight and bias that require grad are not in the optimizer, so fit would update "
                         "nothing; build FusedSGD from the model's parameters (model.parameters())")
    return optimizer


def _is_numpy(v) -> bool:
    return isinstance(v, np.ndarray) or type(v).__module__ == "numpy" and hasattr(v, "__array__")


def _is_array(v) -> bool:
    return isinstance(v, torch.Tensor) or _is_numpy(v)


def make_source(model, data, targets, batch_size, shuffle, seed, generator, check_finite, epochs):
    """TensorSource for tensors or arrays, BatchSource for an iterable of batches."""
    device = model.weight.device
    if device.type == "meta":
        raise ValueError("fit needs a model with real parameters, not meta tensors (use model.to_empty(device=...) "
                         "and initialise it first)")
    if _is_array(data):
        if targets is None:
            raise ValueError("fit(inputs, targets): targets are missing")
        if not _is_array(targets):
            raise TypeError(f"targets must be a torch.Tensor or a NumPy array, got {type(targets).__name__}")
        x, t, per_sample = _prepare_tensors(model, data, targets, device, check_finite)
        batch_size = positive_int("batch_size", x.shape[0] // per_sample if batch_size is None else batch_size)
        source = TensorSource(x, t, batch_size * per_sample, shuffle if shuffle == "device" else bool(shuffle),
                              generator, global_rng=seed is None and generator is None, rows_per_sample=per_sample)
        if source.shuffle == "device":  # a full batch draws nothing (its order cannot change the step)
            source.generator = None if source.full_batch else device_generator(device, seed, generator)
        elif seed is not None:
            source.generator = torch.Generator().manual_seed(seed)
        return source
    if targets is not None:
        raise TypeError(f"fit(inputs, targets) takes tensors or NumPy arrays, got {type(data).__name__} and "
                        f"{type(targets).__name__}; an iterable of (xb, yb) batches goes alone: fit(batches)")
    if not hasattr(data, "__iter__"):
        raise TypeError(f"fit(data): data must be tensors or an iterable of (xb, yb) batches, got "
                        f"{type(data).__name__}")
    if isinstance(data, Iterator) and epochs > 1:  # checked without calling iter(): a DataLoader's iter() draws seeds
        raise TypeError(f"fit(batches) runs {epochs} epochs, so the batches must be re-iterable (a DataLoader or a "
                        f"list), not a one-shot {type(data).__name__}")
    if batch_size is not None or seed is not None or generator is not None:
        raise ValueError("batch_size, seed and generator apply to tensor inputs; the iterable does its own batching")
    if shuffle == "device" or not shuffle:  # shuffle=False would be ignored: the batches come in their own order
        raise ValueError(f"shuffle={shuffle!r} applies to tensor inputs; the iterable does its own shuffling "
                         f"(e.g. DataLoader(..., shuffle=False))")
    return BatchSource(data)


def as_model_tensor(v, dtype: torch.dtype, device: torch.device, warn: Callable[[], None]) -> torch.Tensor:
    """A tensor as it is; a NumPy array converted to ``dtype`` on ``device`` (``warn()`` when that changed a
    value)."""
    if not _is_numpy(v):
        # Non-blocking only onto a GPU: a GPU tensor copied to the host that way lands after the host reads it.
        return torch.as_tensor(v).to(device, non_blocking=device.type != "cpu")
    a = np.asarray(v)
    if a.dtype.kind not in "iuf":
        raise TypeError(f"fit takes numeric arrays, got a NumPy array of {a.dtype}")
    original = torch.from_numpy(np.ascontiguousarray(a))
    converted = original.to(dtype)
    if _may_lose(a.dtype, dtype):  # compared on the host, where the conversion ran
        back = converted.to(original.dtype)
        same = back == original
        if original.is_floating_point():
            same |= back.isnan() & original.isnan()
        if not bool(same.all()):
            warn()
    return converted.to(device, non_blocking=True)


def _may_lose(np_dtype: np.dtype, dtype: torch.dtype) -> bool:
    """Whether converting NumPy ``np_dtype`` to ``dtype`` can change a value (else it is exact)."""
    exact = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16"}.get(dtype)
    return exact is None or not np.can_cast(np_dtype, exact, "safe")


def _prepare_tensors(model, data, targets, device, check_finite):
    """The data on the model's device as (N, D), (N, O), checked once, and the rows per sample of data
    (n, ..., D): the product of its middle dimensions."""
    lost = []
    x, t = (as_model_tensor(v, model.weight.dtype, device, lambda: lost.append(True)) for v in (data, targets))
    if lost:
        warnings.warn(f"fit: converting the NumPy data to the model's {model.weight.dtype} changed some values "
                      f"(precision lost); pass arrays of that dtype, or make the model in a wider dtype",
                      UserWarning, stacklevel=4)
    if x.device.type == "meta" or t.device.type == "meta":
        raise ValueError("fit needs real data, not meta tensors")
    check_inputs(x, model.weight, model.bias, t)
    per_sample = math.prod(x.shape[1:-1])
    x, t = rows(x), rows(t)  # (not reshape(-1, D): ambiguous for a model without features, D = 0)
    if check_finite:  # one sync up front, so a NaN in the data is not reported as a divergence
        if not bool(torch.isfinite(x).all() & torch.isfinite(t).all()):
            name, v = ("inputs", x) if not bool(torch.isfinite(x).all()) else ("targets", t)
            row = int((~torch.isfinite(v).all(dim=1)).nonzero()[0, 0])
            raise ValueError(f"{name} contain NaN or inf (first at row {row}); clean the data before fit")
    return x, t, per_sample
