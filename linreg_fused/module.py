"""FusedLinearRegressor: a drop-in for nn.Linear with a fused loss and fused training."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import functional, serialization, step_cache, train
from .backend import BACKENDS
from .checks import fused_parameters, module_hooked
from .functional import PRECISIONS
from .optim import FusedSGD
from .solver import check_representable
from .stats import LinearStats


class FusedLinearRegressor(nn.Module):
    """y = x·Wᵀ + b, like ``nn.Linear(in_features, out_features, bias)``.

    Same parameters (``weight`` (out, in), ``bias`` (out,)), initialisation,
    state_dict keys and forward. On top of nn.Linear:

    - ``loss(x, target)``: fused linear + MSE (one pass over x);
    - ``train_step(x, target, optimizer)``: one SGD step;
    - ``fit(inputs, targets, epochs=…, batch_size=…, optimizer=…)``: the
      tutorial's training loop on the device.

    backend: "auto" | "triton" | "torch" (see linreg_fused.backend);
    input_precision: "auto" (default) | "ieee" | "tf32" | "tf32x3": how the Triton kernels
    form products (linreg_fused.functional.linear_mse; linreg_fused.backend.resolve_precision).
    """

    __constants__ = ["in_features", "out_features"]
    in_features: int
    out_features: int
    weight: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "auto",
        input_precision: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if input_precision not in PRECISIONS:
            raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = _size("in_features", in_features), _size("out_features", out_features)
        self.backend, self.input_precision = backend, input_precision
        self.weight = nn.Parameter(torch.empty((self.out_features, self.in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, drawing the same random numbers in the same order:
        W ~ U(−1/√in, 1/√in) (kaiming_uniform with a=√5), b ~ U(−1/√in, 1/√in)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1]
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "FusedLinearRegressor":
        """A FusedLinearRegressor holding a copy of ``linear``'s parameters (a frozen one stays frozen)."""
        model = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        model.load_state_dict(linear.state_dict())
        for name, param in model.named_parameters(recurse=False):
            param.requires_grad_(getattr(linear, name).requires_grad)
        return model

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's name, for forward(input=x)
        """(..., in_features) -> (..., out_features)."""
        return functional.linear(input, self.weight, self.bias, backend=self.backend,
                                 input_precision=self.input_precision)

    def loss(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        reduction: str = "mean",
        *,
        optimizer: FusedSGD | None = None,
        process_group: Any = None,
    ) -> torch.Tensor:
        """Fused ``F.mse_loss(self(x), target, reduction=reduction)`` (a 0-d tensor).

        x: (..., in_features); target: (..., out_features). With a FusedSGD
        ``optimizer``, ``loss.backward()`` also applies its step to weight
        and bias in place (and leaves their .grad alone); under
        torch.distributed that step is the step on every rank's rows
        (process_group: see linreg_fused.distributed).
        """
        if optimizer is not None and not isinstance(optimizer, FusedSGD):
            raise TypeError(f"loss(optimizer=) takes a FusedSGD, got {type(optimizer).__name__}; with other "
                            f"optimizers call loss.backward() and optimizer.step() yourself")
        params = fused_parameters(self)  # one call decides, on the common path
        if params is None:
            if optimizer is not None or (process_group is not None and process_group is not False):
                raise ValueError("this model's step must go through model(x) and .grad (it has hooks that model(x) "
                                 "runs, or a weight or bias computed from other parameters: torch.nn.utils."
                                 "parametrize, prune), which a loss with optimizer= or process_group= would skip: "
                                 "use loss(x, target).backward() and optimizer.step() (or train_step)")
            if module_hooked(self):
                return _loss_through_forward(self, x, target, reduction)
            params = self.weight, self.bias  # computed from other parameters: autograd reaches those
        weight, bias = params
        return functional.linear_mse(x, weight, bias, target, reduction, optimizer=optimizer,
                                     backend=self.backend, input_precision=self.input_precision,
                                     process_group=process_group)

    def train_step(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        reduction: str = "mean",
        *,
        process_group: Any = None,
    ) -> torch.Tensor:
        """One optimisation step on the batch (x, target); returns the detached
        loss (before the step) without a host sync.

        With FusedSGD this is ``loss(x, target, optimizer=optimizer).backward()``
        run straight through the kernels (no autograd graph); under
        torch.distributed it is the step on every rank's rows, one all-reduce
        per step, and the loss is theirs (process_group: see
        linreg_fused.distributed). With any other optimizer it is zero_grad,
        loss, backward, step on this rank's rows (for data parallelism wrap
        the model in DistributedDataParallel).
        """
        params = fused_parameters(self) if isinstance(optimizer, FusedSGD) else None  # None: the loop below
        if params is not None:
            weight, bias = params
            if not (isinstance(x, torch.Tensor) and isinstance(target, torch.Tensor) and x.dim() == target.dim() == 2):
                functional.check_inputs(x, weight, bias, target)  # before reshape: errors name the shapes given
                x, target = functional.rows(x), functional.rows(target)
            else:  # a call like an earlier one: straight to its planned launches (step_cache.py)
                loss = step_cache.try_step(x, weight, bias, target, optimizer, reduction, None, self.backend,
                                           self.input_precision, process_group)
                if loss is not None:
                    return loss
            return functional.fused_sgd_step(x, weight, bias, target, optimizer, reduction=reduction,
                                             backend=self.backend, input_precision=self.input_precision,
                                             process_group=process_group)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer (e.g. FusedSGD), got {type(optimizer).__name__}")
        if isinstance(optimizer, FusedSGD) and step_cache.group_given(process_group):
            # The loop below steps on this rank's rows alone: the replicas would drift apart.
            raise ValueError("this model's step must go through model(x) and .grad (it has hooks that model(x) runs, "
                             "or a weight or bias computed from other parameters), which the all-reduce of the fused "
                             "step cannot take: wrap the model in DistributedDataParallel, or pass process_group=False")
        if process_group is not None and process_group is not False:
            raise ValueError("process_group= applies to FusedSGD's fused step; with other optimizers, wrap the "
                             "model in DistributedDataParallel")
        optimizer.zero_grad()
        loss = self.loss(x, target, reduction)
        loss.backward()
        optimizer.step()
        return loss.detach()

    # The training loop (linreg_fused.train.fit), as a method: model.fit(inputs, targets, epochs=..., ...).
    fit = train.fit

    def save(self, path: str | os.PathLike, **metadata) -> None:
        """Write the model to a safetensors file, atomically; metadata: feature_names,
        target_names, input_mean, input_scale (see linreg_fused.serialization.save)."""
        serialization.save(self, path, **metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: torch.device | str | None = None,
             backend: str = "auto", input_precision: str = "auto") -> "FusedLinearRegressor":
        """A model read from a file written by ``save`` (or any safetensors file of
        nn.Linear's weight and bias); its metadata: linreg_fused.serialization.read_info. A file
        that is not such a model (or was changed after it was written) raises ModelFileError."""
        info, state = serialization.read(path)
        # Built on the meta device: loading draws nothing from torch's global random generator.
        model = cls(info.in_features, info.out_features, info.bias, device="meta", dtype=info.dtype,
                    backend=backend, input_precision=input_precision)
        model = model.to_empty(device=torch.device(device) if device is not None else torch.get_default_device())
        model.load_state_dict(state)
        return model

    @torch.no_grad()
    def solve(
        self,
        inputs: torch.Tensor | np.ndarray | LinearStats | Iterable[tuple[torch.Tensor, torch.Tensor]],
        targets: torch.Tensor | np.ndarray | None = None,
        *,
        alpha: float = 0.0,
        precision: str | None = None,
    ) -> torch.Tensor:
        """Set weight and bias to the least-squares (alpha = 0) or ridge solution and return
        the training loss there (mean squared error, a 0-d fp64 tensor).

        inputs, targets: tensors (..., in_features), (..., out_features), moved to the
        model's device; or NumPy arrays (or what np.asarray takes), streamed to the device in
        chunks (LinearStats.from_arrays: a memory-mapped file stays on disk); a model with
        one output also takes a target without its last dimension ((N,) for x (N, D)), as
        scikit-learn does. Or inputs: a LinearStats, or an iterable of (x, t) chunks
        streamed through LinearStats.from_batches (data larger than the device's memory),
        with targets=None. The intercept is not penalised (scikit-learn's Ridge); a model
        without bias fits none. precision: of the statistics pass, "fp32" | "fp64" | None
        (the data's); fp64 is worth its cost when the fit is tight or the features nearly
        collinear. See LinearStats.solve for the method and its accuracy.
        """
        if "weight" not in self._parameters or "bias" not in self._parameters:
            raise ValueError("solve sets weight and bias in place, but this model's weight or bias is computed from "
                             "other parameters (torch.nn.utils.parametrize, prune), which would not hold the "
                             "solution: solve a model without them and load its state_dict")
        stats = _statistics_of(self, inputs, targets, precision)
        if (stats.in_features, stats.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"the statistics are of {stats.in_features}→{stats.out_features} but the model is "
                             f"{self.in_features}→{self.out_features}")
        weight, bias = stats.solve(alpha, fit_intercept=self.bias is not None)
        check_representable(self.weight.dtype, weight, bias)
        self.weight.copy_(weight.to(self.weight))
        if self.bias is not None:
            self.bias.copy_(bias.to(self.bias))
        return stats.loss(self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{extra}"


def _loss_through_forward(model: FusedLinearRegressor, x, target, reduction: str):
    """F.mse_loss(model(x), target), for a model whose hooks model(x) must run (the fused loss runs none)."""
    functional._check_options(reduction, model.input_precision, model.backend)
    functional.check_inputs(x, model.weight, model.bias, target)
    prediction = model(x)
    return F.mse_loss(prediction, target.to(prediction.dtype), reduction=reduction)


def _size(name: str, value: Any) -> int:
    """A layer size as a Python int: any integer (NumPy's too), not a bool."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _statistics_of(model: FusedLinearRegressor, inputs, targets, precision: str | None) -> LinearStats:
    device = model.weight.device
    if isinstance(inputs, LinearStats):
        if targets is not None:
            raise ValueError("solve(stats): the targets are in the statistics; pass targets=None")
        return inputs
    if targets is None:
        if isinstance(inputs, (torch.Tensor, np.ndarray)):
            raise TypeError("solve(x) needs the targets: solve(x, t), or (x, t) chunks, or a LinearStats")
        return LinearStats.from_batches(inputs, device=device, precision=precision, backend=model.backend)
    if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):
        targets = _one_output_target(model, inputs, targets)
        return LinearStats.from_tensors(inputs.to(device), targets.to(device), precision=precision,
                                        backend=model.backend)
    if isinstance(inputs, torch.Tensor) or isinstance(targets, torch.Tensor):
        raise TypeError(f"solve(inputs, targets): give two tensors or two arrays, got {type(inputs).__name__} "
                        f"and {type(targets).__name__}")
    x, t = _float_arrays(inputs, targets)
    if x.ndim != 2:
        raise ValueError(f"solve(inputs, targets): NumPy inputs must be (n_samples, n_features), got {x.shape}")
    t = _one_output_target(model, x, t)
    return LinearStats.from_arrays(x, t, device=device, precision=precision, backend=model.backend)


def _one_output_target(model: FusedLinearRegressor, x, t):
    """t with a trailing dimension of 1 when it is x's leading shape (one target per row)."""
    if t.ndim == x.ndim - 1 and tuple(t.shape) == tuple(x.shape[:-1]):
        if model.out_features != 1:
            raise ValueError(f"a target of shape {tuple(t.shape)} (one value per row) fits a model with one "
                             f"output; this one has {model.out_features}: give targets of shape "
                             f"{(*tuple(x.shape[:-1]), model.out_features)}")
        return t.reshape(*t.shape, 1)
    return t


def _float_arrays(x, t) -> tuple[np.ndarray, np.ndarray]:
    """x, t as NumPy floating-point arrays of one dtype (memory-mapped arrays stay mapped when they are)."""
    arrays = []
    for name, v in (("inputs", x), ("targets", t)):
        a = v if isinstance(v, np.ndarray) else np.asarray(v)
        if a.dtype.kind in "iub":
            a = a.astype(np.float64)  # exact up to 2**53
        elif a.dtype.kind != "f":
            raise TypeError(f"solve: {name} must hold real numbers, got an array of {a.dtype}")
        arrays.append(a)
    common = np.result_type(*arrays)
    return tuple(a if a.dtype == common else a.astype(common) for a in arrays)
