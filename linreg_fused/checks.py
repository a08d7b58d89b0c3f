"""Argument checks of the functional API (linreg_fused.functional, linreg_fused.fused_step):
each raises TypeError/ValueError naming the problem before any work; none runs a kernel or syncs."""

from __future__ import annotations

import math

import torch
from torch.nn.modules import module as _nn_module

from .backend import BACKENDS

REDUCTIONS = ("mean", "sum")
PRECISIONS = ("auto", "ieee", "tf32", "tf32x3")
_HALF = (torch.float16, torch.bfloat16)


def _check_parameters(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1] if x.dim() else 0} features (shape {tuple(x.shape)}) "
                         f"but the weight expects in_features={in_features}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"bias is {bias.dtype} but weight is {weight.dtype}; they must match")
    if x.dtype != weight.dtype and not (x.dtype in _HALF and weight.dtype == torch.float32):
        raise TypeError(f"x is {x.dtype} but the weight is {weight.dtype}: use the same dtype, or half-precision x "
                        f"(float16/bfloat16) with float32 weights (mixed precision)")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"x is on {x.device} but {name} is on {t.device}; move them to one device")


def _check_target(x: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(target.shape) != expected:
        raise ValueError(f"target has shape {tuple(target.shape)} but the predictions have shape {expected}")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got {target.dtype}")
    if target.dtype != x.dtype:
        raise TypeError(f"x is {x.dtype} but target is {target.dtype}; they must match")
    if target.device != x.device:
        raise ValueError(f"x is on {x.device} but target is on {target.device}; move them to one device")
    if math.prod(x.shape[:-1]) == 0:
        raise ValueError(f"empty batch: x has shape {tuple(x.shape)} (no rows)")
    if weight.shape[0] == 0:
        raise ValueError(f"the weight has out_features=0 (shape {tuple(weight.shape)}): a loss over no outputs "
                         f"is undefined")


def _check_options(reduction: str, input_precision: str, backend: str = "auto") -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS}, got {input_precision!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


# torch's global hook registries (dicts it changes in place)
_FORWARD_PRE, _FORWARD = _nn_module._global_forward_pre_hooks, _nn_module._global_forward_hooks
_BACKWARD, _BACKWARD_PRE = _nn_module._global_backward_hooks, _nn_module._global_backward_pre_hooks


def module_hooked(module: torch.nn.Module) -> bool:
    """Whether ``module(x)`` runs hooks: the module's or global forward and backward hooks (a pre-hook of
    torch.nn.utils.prune recomputes the weight). The fused loss, step and fit do not call forward, so
    with hooks they go through ``module(x)``, as nn.Linear + F.mse_loss would."""
    own = module.__dict__  # (read straight from the dicts: 0.1 µs, on train_step's path)
    return bool(_FORWARD_PRE or _FORWARD or _BACKWARD or _BACKWARD_PRE or own["_forward_pre_hooks"]
                or own["_forward_hooks"] or own["_backward_hooks"] or own["_backward_pre_hooks"])


def fused_parameters(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) that a fused step (train_step, loss(optimizer=), fit) trains in place, or None where it
    cannot and must take model(x), backward and optimizer.step(): hooks that model(x) runs
    (``module_hooked``), or a weight or bias computed from other parameters (torch.nn.utils.parametrize,
    prune), which only autograd reaches. One call on train_step's path (the dicts read directly, as
    nn.Module.__getattr__ would search them: 0.4 µs a parameter the other way)."""
    own = module.__dict__
    if (_FORWARD_PRE or _FORWARD or _BACKWARD or _BACKWARD_PRE or own["_forward_pre_hooks"]
            or own["_forward_hooks"] or own["_backward_hooks"] or own["_backward_pre_hooks"]):
        return None
    parameters = own["_parameters"]
    if "weight" in parameters and "bias" in parameters:  # its own parameters (the usual case)
        return parameters["weight"], parameters["bias"]
    weight, bias = module.weight, module.bias
    return None if any(p is not None and p.grad_fn is not None for p in (weight, bias)) else (weight, bias)


def step_through_forward(module: torch.nn.Module) -> bool:
    """Whether a fused step cannot train the module in place (see ``fused_parameters``)."""
    return fused_parameters(module) is None


def check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor) -> None:
    """Raise TypeError/ValueError naming the problem; runs no kernel and syncs nothing."""
    _check_parameters(x, weight, bias)
    _check_target(x, weight, target)
