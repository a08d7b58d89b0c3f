"""The fused computations as PyTorch operators (torch.library), so that
torch.compile, torch.export, CUDA graphs and fake/meta tensors see one op
where the library runs kernels, instead of opaque Python:

    linreg_fused::linear(Tensor x, Tensor weight, Tensor? bias, *, str input_precision, str backend) -> Tensor
    linreg_fused::linear_mse(Tensor x, Tensor weight, Tensor? bias, Tensor target, *, str reduction,
                             bool keep_residual, str input_precision, str backend) -> (Tensor, Tensor, Tensor)
    linreg_fused::linear_mse_partials(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor? row_index,
                                      *, str input_precision, str backend) -> Tensor
    linreg_fused::reduce_update_(Tensor source, Tensor(a!) out, Tensor(b!)? momentum_buffer, Tensor(c!)? out2,
                                 Tensor(d!)? momentum_buffer2, Tensor? grad_output, *, int[] col_starts,
                                 float[] sgd, float[] sgd2, Scalar scale, int? loss_column, Scalar loss_scale,
                                 ScalarType? loss_dtype, str backend, Tensor? lr, Tensor? lr2) -> Tensor
    linreg_fused::fit_small_(Tensor x, Tensor target, Tensor(a!) weight, Tensor(b!)? bias,
                             Tensor(c!)? weight_momentum, Tensor(d!)? bias_momentum, Tensor orders,
                             Tensor(e!) history, *, int batch_size, bool mean, float[] weight_sgd,
                             float[] bias_sgd, str backend) -> ()

Each implementation asks backend.select_ops for the primitives (Triton
kernels or the PyTorch reference) at run time; each fake implementation
(torch.library.register_fake) gives the output shapes without running
anything. The ops are defined with torch.library.define/impl rather than
torch.library.custom_op, and carry no autograd formula of their own: the
thin autograd Functions of functional.py differentiate them. custom_op's
checks and a registered autograd wrapper run in Python on every call, with
or without grad: about twice the time per call of a small op (README).
Mutating ops declare what they write.

The partial-sum buffer has one row per program of the gradient kernel, a
number the launch helper picks: its fake size is an unbacked symbolic size,
so nothing downstream specialises on it (one row on meta tensors).

``RegisteredOps`` offers the backend primitive interface (TritonOps /
TorchOps) on top of these ops: what functional, optim and train call.

Scales are ``Scalar``s, not ``float``s: under torch.compile a mean's 1/N is
symbolic in a dynamic batch size, and a Scalar argument takes it without
specialising the graph to one N. SGD settings travel as a float list
``sgd``: empty means "write the gradient" (no update); otherwise [lr,
momentum, dampening, weight_decay, nesterov, maximize, init_buffer], the
last three 0 or 1 (``pack_sgd``).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .backend import select_ops
from .kernels.specs import ColumnTarget, GradPartials, SGDHyper, accumulator_dtype

NAMESPACE = "linreg_fused"


def loss_scale(reduction: str, n_rows, out_features: int):
    """The factor from Σ R² to the loss: 1/(N·O) for "mean", 1 for "sum"."""
    return 1.0 / (n_rows * out_features) if reduction == "mean" else 1.0


def pack_sgd(hyper: SGDHyper | None, init_buffer: bool = False) -> list[float]:
    """A target's SGD settings as the ops take them ([] for "write the gradient")."""
    if hyper is None:
        return []
    return [hyper.lr, hyper.momentum, hyper.dampening, hyper.weight_decay, float(hyper.nesterov),
            float(hyper.maximize), float(init_buffer)]


def _lr_tensor(target: ColumnTarget) -> Tensor | None:
    return None if target.hyper is None else target.hyper.lr_tensor


def unpack_sgd(sgd: list[float]) -> tuple[SGDHyper | None, bool]:
    """(hyper, init_buffer) from ``pack_sgd``'s list."""
    if not sgd:
        return None, False
    if len(sgd) != 7:
        raise ValueError(f"sgd takes [] or 7 values (lr, momentum, dampening, weight_decay, nesterov, maximize, "
                         f"init_buffer), got {len(sgd)}")
    lr, momentum, dampening, weight_decay, nesterov, maximize, init = sgd
    return SGDHyper(lr, momentum, dampening, weight_decay, bool(nesterov), bool(maximize)), bool(init)


def _n_columns(weight: Tensor) -> int:
    out_features, in_features = weight.shape
    return out_features * in_features + out_features + 1


def _fake_partials(x: Tensor, weight: Tensor) -> Tensor:
    """The (P, K) partial buffer of a fake implementation. P is the launch
    helper's choice: an unbacked size under FakeTensorMode (torch.compile,
    export); on meta tensors, where nothing will ever run, one row."""
    n_programs = 1 if x.device.type == "meta" else torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((n_programs, _n_columns(weight)), dtype=accumulator_dtype(weight.dtype))


def _define(name: str, schema: str, *, autocast_to_lower: bool = False):
    """Define linreg_fused::<name> and register the decorated function as its
    implementation for every device (it asks backend.py what runs there, and
    says why when nothing can).

    Under torch.autocast the op runs on the dtypes it is given (as its fake
    says), with autocast off inside: otherwise the torch backend's F.linear and
    matmuls would drop to bfloat16/float16 where the Triton kernels keep float32.
    autocast_to_lower: first cast the floating inputs (not float64) to
    autocast's dtype, as autocast does for aten::linear (nn.Linear's output).

    The implementation is hidden from torch.compile (torch.compiler.disable):
    a graph calls the op, never traces into it; and where a compiled function
    without fullgraph runs part of itself eagerly (after a graph break, or in
    a backward), Dynamo would otherwise try to trace the launch helpers and,
    under TRITON_INTERPRET, Triton's interpreter itself."""
    qualname = f"{NAMESPACE}::{name}"
    torch.library.define(qualname, schema)
    register = torch.library.impl(qualname, "CompositeExplicitAutograd")

    def decorate(fn):
        register(torch.compiler.disable(fn, recursive=True))
        for device_type in _AUTOCAST_DEVICES:
            _register_autocast(qualname, name, device_type, autocast_to_lower)
        return fn

    return decorate


_AUTOCAST_DEVICES = ("cpu", "cuda")


def _register_autocast(qualname: str, name: str, device_type: str, cast: bool) -> None:
    """The op's kernel for the Autocast<device> dispatch key: cast (or not), then call the op with that key
    excluded (what torch.library.register_autocast does, which takes neither kwargs nor autocast's own dtype)."""
    key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    excluded = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

    def kernel(*args, **kwargs):
        if cast:
            dtype = torch.get_autocast_dtype(device_type)
            args = tuple(_autocast_cast(a, device_type, dtype) for a in args)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return getattr(torch.ops.linreg_fused, name).default(*args, **kwargs)

    torch.library.impl(qualname, key)(kernel)


def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    eligible = (isinstance(value, Tensor) and value.is_floating_point() and value.device.type == device_type
                and value.dtype is not torch.float64)
    return value.to(dtype) if eligible else value


# ---------------------------------------------------------------- linear
@_define("linear", "(Tensor x, Tensor weight, Tensor? bias, *, str input_precision='auto', str backend='auto') "
                   "-> Tensor", autocast_to_lower=True)
def _linear(x, weight, bias, *, input_precision="auto", backend="auto"):
    """y = x·Wᵀ + b. x: (N, D); weight: (O, D); bias: (O,) or None -> (N, O)."""
    return select_ops(backend, x.device).linear(x, weight, bias, input_precision=input_precision)


@torch.library.register_fake(f"{NAMESPACE}::linear")
def _(x, weight, bias, *, input_precision="auto", backend="auto"):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=torch.promote_types(x.dtype, weight.dtype))


# ---------------------------------------------------------------- linear + MSE
@_define("linear_mse_partials", "(Tensor x, Tensor weight, Tensor? bias, Tensor target, Tensor? row_index, *, "
                                "str input_precision='auto', str backend='auto') -> Tensor")
def _linear_mse_partials(x, weight, bias, target, row_index, *, input_precision="auto", backend="auto"):
    """One pass over a batch: (P, K) partial sums, K = O·D + O + 1, columns
    [Rᵀ·X (O·D, row-major) | Σ R (O) | Σ R² (1)], R = x·Wᵀ + b − target.
    x: (N, D), target: (N, O); row_index: optional (n,) int64, the batch is then those rows."""
    return select_ops(backend, x.device).grad_partials(
        x, weight, bias, target, row_index=row_index, store_residual=False, input_precision=input_precision).buffer


@torch.library.register_fake(f"{NAMESPACE}::linear_mse_partials")
def _(x, weight, bias, target, row_index, *, input_precision="auto", backend="auto"):
    return _fake_partials(x, weight)


@_define("linear_mse", "(Tensor x, Tensor weight, Tensor? bias, Tensor target, *, str reduction='mean', "
                       "bool keep_residual=False, str input_precision='auto', str backend='auto') "
                       "-> (Tensor, Tensor, Tensor)")
def _linear_mse(x, weight, bias, target, *, reduction="mean", keep_residual=False, input_precision="auto",
                backend="auto"):
    """F.mse_loss(x·Wᵀ + b, target, reduction) for x (N, D), target (N, O).

    Returns (loss 0-d, partials (P, K) as linear_mse_partials, residual):
    the residual R (N, O) in the accumulator dtype when keep_residual (for
    the gradients of x and target), else an empty (0, O) tensor."""
    ops = select_ops(backend, x.device)
    partials = ops.grad_partials(x, weight, bias, target, row_index=None, store_residual=keep_residual,
                                 input_precision=input_precision)
    loss = ops.sum_loss(partials, loss_scale(reduction, x.shape[0], weight.shape[0]),
                        torch.promote_types(x.dtype, weight.dtype))
    residual = partials.residual if keep_residual else partials.buffer.new_empty((0, weight.shape[0]))
    return loss, partials.buffer, residual


@torch.library.register_fake(f"{NAMESPACE}::linear_mse")
def _(x, weight, bias, target, *, reduction="mean", keep_residual=False, input_precision="auto", backend="auto"):
    return (x.new_empty((), dtype=torch.promote_types(x.dtype, weight.dtype)), _fake_partials(x, weight),
            x.new_empty((x.shape[0] if keep_residual else 0, weight.shape[0]), dtype=accumulator_dtype(weight.dtype)))


# ---------------------------------------------------------------- reduce and update
@_define("reduce_update_", "(Tensor source, Tensor(a!) out, Tensor(b!)? momentum_buffer, Tensor(c!)? out2, "
                           "Tensor(d!)? momentum_buffer2, Tensor? grad_output, *, int[] col_starts, float[] sgd, "
                           "float[] sgd2, Scalar scale, int? loss_column=None, Scalar loss_scale=1., "
                           "ScalarType? loss_dtype=None, str backend='auto', Tensor? lr=None, Tensor? lr2=None) "
                           "-> Tensor")
def _reduce_update_(source, out, momentum_buffer, out2, momentum_buffer2, grad_output, *, col_starts, sgd, sgd2,
                    scale, loss_column=None, loss_scale=1.0, loss_dtype=None, backend="auto", lr=None, lr2=None):
    """Finish partial sums and write a gradient or apply SGD, for one or two targets in one launch.

    source: (P, K) partial sums (a gradient is a source with one row).
    For out (and out2): g = scale · grad_output · Σ_p source[p, c : c + out.numel()] with
    c = col_starts[i]; then out = g (sgd empty) or the SGD update of the
    parameter ``out`` and its momentum buffer in place (see pack_sgd); lr
    (lr2), a one-element tensor on source's device, replaces sgd's learning
    rate: it is read there (a tensor learning rate: no sync, no recompile).
    Returns loss_scale · Σ_p source[p, loss_column] as a 0-d loss_dtype
    tensor, or an empty (0,) tensor without loss_column."""
    targets = []
    for column, param, buffer, settings, rate in ((col_starts[0], out, momentum_buffer, sgd, lr),
                                                  (col_starts[-1], out2, momentum_buffer2, sgd2, lr2)):
        if param is not None:
            hyper, init = unpack_sgd(settings)
            if hyper is not None and rate is not None:
                hyper = replace(hyper, lr=0.0, lr_tensor=rate)
            targets.append(ColumnTarget(column, param, hyper, buffer, init))
    loss = select_ops(backend, source.device).reduce_update_(
        source, targets, scale=scale, grad_output=grad_output, loss_column=loss_column, loss_scale=loss_scale,
        loss_dtype=loss_dtype)
    return loss if loss is not None else source.new_empty(0)


@torch.library.register_fake(f"{NAMESPACE}::reduce_update_")
def _(source, out, momentum_buffer, out2, momentum_buffer2, grad_output, *, col_starts, sgd, sgd2, scale,
      loss_column=None, loss_scale=1.0, loss_dtype=None, backend="auto", lr=None, lr2=None):
    return source.new_empty(0) if loss_column is None else source.new_empty((), dtype=loss_dtype)


@_define("fit_small_", "(Tensor x, Tensor target, Tensor(a!) weight, Tensor(b!)? bias, "
                       "Tensor(c!)? weight_momentum, Tensor(d!)? bias_momentum, Tensor orders, Tensor(e!) history, "
                       "*, int batch_size, bool mean, float[] weight_sgd, float[] bias_sgd, str backend='auto') "
                       "-> ()")
def _fit_small_(x, target, weight, bias, weight_momentum, bias_momentum, orders, history, *, batch_size, mean,
                weight_sgd, bias_sgd, backend="auto"):
    """Every epoch of ``orders`` (E, N) for a problem small enough for one
    program (see kernels/fused_fit.py): SGD steps over batches of batch_size
    rows in each epoch's order; history (E,) receives the epochs' mean batch
    losses; the parameters and buffers end at the last finite epoch. An
    empty weight_sgd or bias_sgd leaves that parameter untouched."""
    weight_hyper, init_weight = unpack_sgd(weight_sgd)
    bias_hyper, init_bias = unpack_sgd(bias_sgd)
    select_ops(backend, x.device).fit_small(
        x, target, weight, bias, weight_momentum, bias_momentum, orders, history, batch_size=batch_size, mean=mean,
        weight_hyper=weight_hyper, bias_hyper=bias_hyper, init_weight_buffer=init_weight, init_bias_buffer=init_bias)


@torch.library.register_fake(f"{NAMESPACE}::fit_small_")
def _(x, target, weight, bias, weight_momentum, bias_momentum, orders, history, *, batch_size, mean, weight_sgd,
      bias_sgd, backend="auto"):
    return None


# The ops (OpOverloads: calling one skips the overload lookup of torch.ops.linreg_fused.<name>).
linear = torch.ops.linreg_fused.linear.default
linear_mse = torch.ops.linreg_fused.linear_mse.default
linear_mse_partials = torch.ops.linreg_fused.linear_mse_partials.default
reduce_update_ = torch.ops.linreg_fused.reduce_update_.default
fit_small_ = torch.ops.linreg_fused.fit_small_.default


# ---------------------------------------------------------------- the primitives, through the ops
class RegisteredOps:
    """The backend primitive interface (see backend.TritonOps) on top of the
    registered ops, for tensors on ``device``: functional, optim and train
    call these, so that whatever traces them sees ops."""

    def __init__(self, backend: str, device: torch.device) -> None:
        self.backend, self.device = backend, device

    @property
    def name(self) -> str:
        """"triton" or "torch": what the ops run (decided by backend.select_ops)."""
        return select_ops(self.backend, self.device).name

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, input_precision: str) -> Tensor:
        return linear(x, weight, bias, input_precision=input_precision, backend=self.backend)

    def grad_partials(self, x, weight, bias, target, *, row_index, store_residual, input_precision) -> GradPartials:
        if store_residual:
            raise ValueError("grad_partials through the ops keeps no residual; use linear_mse(keep_residual=True)")
        buffer = linear_mse_partials(x, weight, bias, target, row_index, input_precision=input_precision,
                                     backend=self.backend)
        n_rows = row_index.shape[0] if row_index is not None else x.shape[0]
        return GradPartials(buffer, None, n_rows, weight.shape[0], weight.shape[1])

    def sum_loss(self, partials: GradPartials, scale: float, dtype: torch.dtype) -> Tensor:
        return (partials.buffer[:, partials.loss_column].sum() * scale).to(dtype)

    def reduce_update_(self, source: Tensor, targets: list[ColumnTarget], *, scale: float,
                       grad_output: Tensor | None, loss_column: int | None = None, loss_scale: float = 1.0,
                       loss_dtype: torch.dtype | None = None) -> Tensor | None:
        if not targets:
            raise ValueError("reduce_update_ needs at least one target")
        loss = None
        for i in range(0, len(targets), 2):  # two targets per launch (weight and bias)
            first, second = targets[i], targets[i + 1] if i + 1 < len(targets) else None
            result = reduce_update_(
                source, first.out, first.momentum_buffer, None if second is None else second.out,
                None if second is None else second.momentum_buffer, grad_output,
                col_starts=[first.col_start] + ([] if second is None else [second.col_start]),
                sgd=pack_sgd(first.hyper, first.init_buffer),
                sgd2=[] if second is None else pack_sgd(second.hyper, second.init_buffer),
                scale=scale, loss_column=loss_column if i == 0 else None, loss_scale=loss_scale,
                loss_dtype=loss_dtype, backend=self.backend, lr=_lr_tensor(first),
                lr2=None if second is None else _lr_tensor(second))
            if i == 0 and loss_column is not None:
                loss = result
        return loss

    def fit_small_supported(self, batch_size: int, in_features: int, out_features: int) -> bool:
        return select_ops(self.backend, self.device).fit_small_supported(batch_size, in_features, out_features)

    def fit_small(self, x, target, weight, bias, weight_buffer, bias_buffer, permutations, history, *,
                  batch_size: int, mean: bool, weight_hyper: SGDHyper | None, bias_hyper: SGDHyper | None,
                  init_weight_buffer: bool, init_bias_buffer: bool) -> None:
        fit_small_(
            x, target, weight, bias, weight_buffer, bias_buffer, permutations, history, batch_size=batch_size,
            mean=mean, weight_sgd=pack_sgd(weight_hyper, init_weight_buffer),
            bias_sgd=[] if bias is None else pack_sgd(bias_hyper, init_bias_buffer), backend=self.backend)
