"""The one place that decides which implementation runs.

``backend="auto"`` runs the Triton kernels on CUDA tensors, and on CPU
tensors when Triton's interpreter is on (``TRITON_INTERPRET=1``, set before
the first kernel is used); otherwise the pure-PyTorch reference.
``"triton"`` and ``"torch"`` force one; asking for Triton where it cannot run
is an error that says why: Triton missing, older than ``MIN_TRITON`` (a
CUDA build of torch may bring an older one), or the interpreter off or set
too late. Nothing is probed at import time: the kernels are imported on
first use. What cannot change within a process (whether Triton is installed,
its version, whether the interpreter runs these kernels) is looked up once;
TRITON_INTERPRET and how Triton was imported are read at every call.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
import sys
from dataclasses import replace

import torch

from .kernels.specs import ColumnTarget, GradPartials
from .reference import TORCH_OPS, TorchOps

BACKENDS = ("auto", "triton", "torch")

# How a repeated fused SGD step launches on the Triton backend (linreg_fused/step_cache.py): 2 runs
# the gradient kernel, then the reduce-and-update kernel (both checked on an H200); "auto" follows
# kernels/sgd_step.one_launch (one launch where the last program's reduction is short: the last
# program to take an atomic ticket reduces the partials and updates, bitwise equal to two launches
# under the interpreter); 1 forces the one-launch kernel. That kernel's cross-program ordering
# (barrier, acq_rel ticket) is exactly what the interpreter cannot show and it has not yet run on a
# GPU, so the default stays 2 until bench/gpu_step.py's parity passes on a card. Read per step.
STEP_LAUNCHES: str | int = 2


# The oldest Triton the kernels run on: tl.dot with M or N below 16 (small O) is refused before 3.6.
# PyPI's CUDA builds of torch bring their own Triton (torch 2.11: 3.6), which may be older.
MIN_TRITON = (3, 6)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None if they can."""
    reason = _installation_problem()
    if reason is not None:
        return reason
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return _cpu_problem(interpreter_enabled(), _interpreter_consistent())
    return f"Triton kernels run on CUDA devices (or the CPU through the interpreter), not on {device.type!r}"


@functools.cache
def _cpu_problem(interpreting: bool, consistent: bool) -> str | None:
    """Why the kernels cannot run on CPU tensors, for the interpreter's setting and its consistency with
    how Triton was imported (both read at every call: the environment may change); the probe of the
    interpreter runs once."""
    if not interpreting:
        return ("the tensors are on the CPU and Triton's interpreter is off; use CUDA tensors, or set "
                "TRITON_INTERPRET=1 in the environment before the first kernel runs")
    if not consistent:
        return ("TRITON_INTERPRET=1 was set after Triton was imported (PyTorch imports it lazily, e.g. "
                "in optimizer steps), so Triton's own functions were built for a GPU; set it in the "
                "environment before the program starts")
    from .kernels.probe import interpreter_runs_runtime_loops

    if not interpreter_runs_runtime_loops():
        import triton

        return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound with "
                "this NumPy (it reads the bound with int() of a 1-element array; Triton 3.9's does not)")
    return None


@functools.cache
def _installation_problem() -> str | None:
    """Why no Triton can run here at all (none installed, or one older than MIN_TRITON), or None.
    Cached: what is installed does not change under a running process (import_module caches it
    too), and a search of sys.path at every op (find_spec) costs more than the op's launch."""
    version = triton_version()
    if version is None:
        return "Triton is not installed (pip install 'linreg-fused[triton]', or triton itself)"
    release = _release(version)
    if release is not None and release < MIN_TRITON:
        wanted = ".".join(map(str, MIN_TRITON))
        return (f"Triton {version} is installed, but the kernels need Triton >= {wanted} (older releases refuse "
                f"their small matrix products); upgrade it (pip install 'triton>={wanted}'), or a torch build that "
                f"brings a newer one")
    return None


def triton_version() -> str | None:
    """The installed Triton's version, read without importing it (importing Triton decides whether its
    interpreter is on: see _interpreter_consistent), or None when none is installed; "" if unknown."""
    module = sys.modules.get("triton")
    if module is not None:
        return str(getattr(module, "__version__", ""))
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return None
    try:  # triton/__init__.py states it: __version__ = '3.9.0'
        with open(spec.origin, encoding="utf-8") as init:
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init.read(), re.MULTILINE)
        if found:
            return found.group(1)
    except (OSError, TypeError):
        pass
    try:  # or its distribution's metadata
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return ""


def _release(version: str) -> tuple[int, int] | None:
    """(major, minor) of a version string ("3.6.0", "3.7.0+git1234", "3.5.1rc2"), or None if unreadable."""
    found = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def _interpreter_consistent() -> bool:
    """Triton decorates its own library functions when triton.language is first
    imported: for the interpreter to work, that must have happened with it on."""
    language = sys.modules.get("triton.language")
    return language is None or type(language.cdiv).__name__ == "InterpretedFunction"


def select_ops(backend: str, device: torch.device) -> "TritonOps | TorchOps":
    """The implementation for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return TORCH_OPS
    reason = triton_unavailable_reason(device)
    if reason is None:
        return _triton_ops()
    if backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    return TORCH_OPS


# torch.get_float32_matmul_precision() -> the products that honour it (each at least as accurate as
# what PyTorch itself would run: "high" allows TF32 there, tf32x3 here).
_FP32_PRECISION = {"highest": "ieee", "high": "tf32x3", "medium": "tf32"}


def resolve_precision(input_precision: str, x_dtype: torch.dtype) -> str:
    """The products the Triton kernels run for ``input_precision="auto"`` (others pass through).

    - float32 inputs: what ``torch.get_float32_matmul_precision()`` asks of nn.Linear:
      "highest" (PyTorch's default) -> "ieee" (FMAs), "high" -> "tf32x3", "medium" -> "tf32".
    - bfloat16/float16 inputs (fp32 or 16-bit weights): "tf32x3". Each 16-bit input is exact
      in TF32, so only the weight's (and the residual's) low bits are split into a second TF32
      term: measured on an H200 (bench/results/H200-2026-11-26-sweep.json), dW's relative error
      against float64 is 1.3e-7 to 1.5e-7 (IEEE FMAs: 6e-8), and the gradient pass runs 1.5x to
      2.8x faster than with FMAs.
    - float64: "ieee" (tensor cores have no fp64 split here).
    """
    if input_precision != "auto":
        return input_precision
    if x_dtype in (torch.bfloat16, torch.float16):
        return "tf32x3"
    if x_dtype == torch.float32:
        return _FP32_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")
    return "ieee"


def describe(ops: "TritonOps | TorchOps", device: torch.device) -> str:
    """A one-line account of what runs, e.g. for the command line."""
    if ops.name == "torch":
        return f"PyTorch reference on {device}"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU through Triton's interpreter"
    return f"Triton kernels on {where} ({device})"


@functools.cache
def _triton_ops() -> "TritonOps":
    return TritonOps()


class TritonOps:
    """The backend primitives as Triton launches (see kernels/)."""

    name = "triton"

    def __init__(self) -> None:
        # Imported here, not at module import: jit decoration reads TRITON_INTERPRET.
        from .kernels import formulations, fused_fit, linear_stats, reduce_update, stats_sgd

        self._fused_fit = fused_fit
        self._stats = linear_stats
        self._epochs = stats_sgd
        self._passes = formulations  # the gradient pass and inference, in the formulation config decides
        self._reduce = reduce_update

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *,
               input_precision: str) -> torch.Tensor:
        out_dtype = torch.promote_types(x.dtype, weight.dtype)
        return self._passes.forward(x, weight, bias, out_dtype=out_dtype,
                                    input_precision=resolve_precision(input_precision, x.dtype))

    def grad_partials(self, x, weight, bias, target, *, row_index, store_residual, input_precision) -> GradPartials:
        return self._passes.grad_partials(x, weight, bias, target, row_index=row_index,
                                          store_residual=store_residual,
                                          input_precision=resolve_precision(input_precision, x.dtype))

    def sum_loss(self, partials: GradPartials, scale: float, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty((), device=partials.buffer.device, dtype=dtype)
        return self._reduce.sum_column(partials.buffer, partials.loss_column, scale, out)

    def reduce_update_(self, source: torch.Tensor, targets: list[ColumnTarget], *, scale: float,
                       grad_output: torch.Tensor | None, loss_column: int | None = None, loss_scale: float = 1.0,
                       loss_dtype: torch.dtype | None = None) -> torch.Tensor | None:
        # The kernel walks flat columns: give it contiguous storage, and copy back where it had to make some.
        launch, copied = [], []
        for t in targets:
            out = t.out.detach()
            if not out.is_contiguous():
                copied.append((t.out, out := out.contiguous()))
            launch.append(replace(t, out=out))
        loss = None
        if loss_column is not None:
            loss = torch.empty((), device=source.device, dtype=loss_dtype)
        for i in range(0, max(len(launch), 1), 2):  # two targets per launch (weight and bias); none is an error
            self._reduce.reduce_update_(source, launch[i : i + 2], scale=scale, grad_output=grad_output,
                                        loss_out=loss if i == 0 else None, loss_column=loss_column or 0,
                                        loss_scale=loss_scale)
        with torch.no_grad():
            for param, out in copied:
                param.copy_(out)
        for t in targets:
            if t.hyper is not None and not any(t.out is param for param, _ in copied):
                # The kernel wrote through a pointer: tell autograd the tensor changed, so a graph
                # that saved the old value raises instead of silently using the new one.
                torch.autograd.graph.increment_version(t.out)
        return loss

    def fit_small_supported(self, batch_size: int, in_features: int, out_features: int) -> bool:
        return self._fused_fit.fit_small_supported(batch_size, in_features, out_features)

    def fit_small(self, x, target, weight, bias, weight_buffer, bias_buffer, permutations, history, *,
                  weight_hyper, bias_hyper, **kwargs) -> None:
        """kernels.fused_fit.fit_small; a hyper of None leaves that parameter untouched."""
        self._fused_fit.fit_small(x, target, weight.detach(), None if bias is None else bias.detach(),
                                  weight_buffer, bias_buffer, permutations, history, weight_hyper=weight_hyper,
                                  bias_hyper=bias_hyper, **kwargs)
        for p, hyper in ((weight, weight_hyper), (bias, bias_hyper)):
            if p is not None and hyper is not None:
                torch.autograd.graph.increment_version(p)

    # ---------------------------------------------------------------- sufficient statistics
    def linear_moments(self, x: torch.Tensor, target: torch.Tensor, *, fp64: bool) -> tuple:
        """The statistics pass (kernels/linear_stats.py). Its program holds Tᵀ·T, so more than
        MAX_OUT_FEATURES outputs take the reference's fp64 matrix products instead."""
        if target.shape[1] > self._stats.MAX_OUT_FEATURES:
            return TORCH_OPS.linear_moments(x, target, fp64=fp64)
        return self._stats.linear_moments(x, target, fp64=fp64)

    def stats_epochs_in_one_launch(self, in_features: int, out_features: int) -> bool:
        return self._epochs.stats_sgd_supported(in_features, out_features)

    def stats_sgd_epochs(self, n_rows: int, moments: tuple, weight: torch.Tensor, bias: torch.Tensor | None,
                         weight_buffer: torch.Tensor | None, bias_buffer: torch.Tensor | None,
                         history: torch.Tensor, **kwargs) -> None:
        """Full-batch epochs on the statistics: one launch while W·M_xx takes a few blocks; a wider
        problem (or non-contiguous parameters) runs the reference's loop of small matrix products
        on the device (no sync either way)."""
        contiguous = all(t is None or t.is_contiguous() for t in (weight, bias, weight_buffer, bias_buffer))
        if not contiguous or not self._epochs.stats_sgd_supported(*reversed(weight.shape)):
            TORCH_OPS.stats_sgd_epochs(n_rows, moments, weight, bias, weight_buffer, bias_buffer, history, **kwargs)
            return
        self._epochs.stats_sgd_epochs(n_rows, moments, weight.detach(), None if bias is None else bias.detach(),
                                      weight_buffer, bias_buffer, history, **kwargs)
        for p in (weight, bias):
            if p is not None:
                torch.autograd.graph.increment_version(p)
