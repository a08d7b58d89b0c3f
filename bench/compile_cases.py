"""The launches the compile report compiles (bench/compile_report.py): every benchmark regime's
launches as the launch helpers plan them for a GPU of each architecture, the awkward SHAPES, and
the rows/chunks formulations (kernels/formulations.py) on the full-batch regimes. Plain planning:
tensors on the meta device, nothing compiled here."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/regimes.py

import torch  # noqa: E402

from regimes import REGIMES, Regime  # noqa: E402


@dataclass(frozen=True)
class Arch:
    """Limits of one GPU architecture (CUDA programming guide, compute capability tables)."""

    capability: int
    card: str
    multiprocessors: int
    shared_per_block: int  # opt-in maximum per block
    shared_per_sm: int
    registers_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024


ARCHS = {
    90: Arch(90, "H100/H200 SXM", 132, 232448, 233472),
    80: Arch(80, "A100", 108, 166912, 167936),
}
IN_FLIGHT_TARGET = 25 * 1024
PRECISIONS = ("ieee", "tf32", "tf32x3")


# ------------------------------------------------------------------ the launches
@dataclass
class Case:
    regime: str
    kernel: str
    dtype: str
    precision: str
    plan: Any  # kernels.plan.LaunchPlan
    hot: bool  # a launch of a benchmark regime in fp32/bf16 (must not spill)
    memory_bound: bool  # must keep IN_FLIGHT_TARGET bytes in flight per SM
    tile_bytes: int  # bytes one program loads per tile (per pipeline stage)
    tensor_core: bool  # a tl.dot with a tensor-core precision
    fp64_args: tuple[str, ...] = ()  # float arguments that must reach the GPU as fp64
    formulation: str = "default"  # kernels/formulations.py: default, rows, chunks, mma
    # What the time model (bench/sass.py) needs, for the gradient and inference launches (0: none):
    loop_trips: int = 0  # iterations of the main loop over the whole launch (all programs)
    bytes_moved: int = 0  # X and T read (gradient), X read and Y written (inference)
    fmas: int = 0  # useful multiply-adds: 2·N·D·O (gradient), N·D·O (inference)


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def regime_cases(regime: Regime, dtype_name: str, precision: str, profile) -> list[Case]:
    """The launches one step (or forward, or fit) of ``regime`` makes."""
    from linreg_fused.kernels import fused_fit, linear_forward, linear_mse_grad, reduce_update
    from linreg_fused.kernels.specs import ColumnTarget, SGDHyper

    dt = _DTYPES[dtype_name]
    pdt = torch.float64 if dt == torch.float64 else torch.float32  # fp32 master weights for bf16 inputs
    n, d, o = regime.n_rows, regime.in_features, regime.out_features
    elem = torch.finfo(dt).bits // 8
    hot = dtype_name != "fp64"
    common = dict(regime=regime.name, dtype=dtype_name, precision=precision, hot=hot)
    x, t = _meta(n, d, dtype=dt), _meta(n, o, dtype=dt)
    w, b = _meta(o, d, dtype=pdt), _meta(o, dtype=pdt)
    if regime.kind == "statistics":
        return []  # the statistics pass and epochs kernels: bench/compile_stats.py
    if regime.kind == "fit" and fused_fit.fit_small_supported(regime.batch_size, d, o):
        steps = regime.epochs
        plan = fused_fit.plan_fit_small(
            x, t, w, b, None, None, _meta(steps, n, dtype=torch.int64), _meta(steps, 2, dtype=pdt),
            batch_size=regime.batch_size, mean=True, weight_hyper=SGDHyper(regime.lr), bias_hyper=SGDHyper(regime.lr),
            init_weight_buffer=False, init_bias_buffer=False, profile=profile)
        fp64 = ("w_lr", "w_momentum", "w_dampening", "w_weight_decay", "b_lr")
        return [Case(kernel="fit", plan=plan, memory_bound=False, tile_bytes=0, tensor_core=False,
                     fp64_args=fp64, **common)]
    if regime.kind == "inference":
        plan, _ = linear_forward.plan_linear_forward(x, w, b, out_dtype=pdt, input_precision=precision,
                                                     profile=profile)
        c = plan.constexprs
        tile = c["BLOCK_N"] * min(c["BLOCK_D"], d) * elem
        # One program per row tile and O block; its loop (if any) walks D in chunks.
        trips = plan.grid[0] * plan.grid[1] * (1 if c["ONE_D_BLOCK"] else -(-d // c["BLOCK_D"]))
        return [Case(kernel="forward", plan=plan, memory_bound=True, tile_bytes=tile,
                     tensor_core=c["USE_DOT"] and c["INPUT_PRECISION"] != "ieee", loop_trips=trips,
                     bytes_moved=n * d * elem + n * o * 4, fmas=n * d * o, **common)]
    rows = _meta(regime.batch_size, dtype=torch.int64) if regime.batch_size else None
    grad, partials = linear_mse_grad.plan_linear_mse_partials(x, w, b, t, row_index=rows, input_precision=precision,
                                                              profile=profile)
    c = grad.constexprs
    tile = c["BLOCK_N"] * ((min(c["BLOCK_D"], d) + o) if c["ONE_D_BLOCK"] else c["BLOCK_D"]) * elem
    rows_per_step = regime.rows_per_step
    cases = [Case(kernel="grad", plan=grad, memory_bound=regime.batch_size is None, tile_bytes=tile,
                  tensor_core=c["USE_DOT"] and c["INPUT_PRECISION"] != "ieee",
                  loop_trips=-(-rows_per_step // c["BLOCK_N"]), bytes_moved=rows_per_step * (d + o) * elem,
                  fmas=2 * rows_per_step * d * o, **common)]
    buffer = partials.buffer
    scale = 1.0 / (rows_per_step * o)
    hyper = SGDHyper(lr=regime.lr)
    update = reduce_update.plan_reduce_update(
        buffer, [ColumnTarget(0, w, hyper), ColumnTarget(o * d, b, hyper)], scale=2 * scale,
        loss_out=_meta(dtype=pdt), loss_column=partials.loss_column, loss_scale=scale, profile=profile)
    reduce_tile = update.constexprs["BLOCK_P"] * update.constexprs["BLOCK_COLS"] * buffer.element_size()
    fp64 = ("scale", "a_lr", "a_momentum", "a_weight_decay", "loss_scale")
    cases.append(Case(kernel="update", plan=update, memory_bound=False, tile_bytes=reduce_tile, tensor_core=False,
                      fp64_args=fp64, **common))
    if regime.name == "wide" and precision == "ieee":  # every branch of the update, once per accumulator dtype
        full = SGDHyper(lr=regime.lr, momentum=0.9, dampening=0.1, weight_decay=1e-4, nesterov=False, maximize=True)
        targets = [ColumnTarget(0, w, full, _meta(o, d, dtype=pdt)), ColumnTarget(o * d, b, full, _meta(o, dtype=pdt))]
        update_all = reduce_update.plan_reduce_update(
            buffer, targets,
            scale=2 * scale, grad_output=_meta(dtype=pdt), loss_out=_meta(dtype=pdt),
            loss_column=partials.loss_column, loss_scale=scale, profile=profile)
        cases.append(Case(kernel="update+momentum", plan=update_all, memory_bound=False, tile_bytes=reduce_tile,
                          tensor_core=False, fp64_args=fp64, **common))
        grads = reduce_update.plan_reduce_update(
            buffer, [ColumnTarget(0, _meta(o, d, dtype=pdt)), ColumnTarget(o * d, _meta(o, dtype=pdt))],
            scale=2 * scale, grad_output=_meta(dtype=pdt), profile=profile)
        cases.append(Case(kernel="backward", plan=grads, memory_bound=False, tile_bytes=reduce_tile,
                          tensor_core=False, fp64_args=("scale",), **common))
        loss = reduce_update.plan_sum_column(buffer, partials.loss_column, scale, _meta(dtype=pdt), profile=profile)
        cases.append(Case(kernel="loss", plan=loss, memory_bound=False, tile_bytes=0, tensor_core=False,
                          fp64_args=("scale",), **common))
    return cases


def probe_cases(profile) -> list[Case]:
    """Configs that no regime picks today but that must keep their promise: a
    16×256×16 FMA product (all three dims >= 16) stays FMAs in IEEE fp32."""
    from linreg_fused.kernels import linear_mse_grad
    from linreg_fused.kernels.config import TileConfig

    x, t = _meta(1 << 20, 256, dtype=torch.float32), _meta(1 << 20, 16, dtype=torch.float32)
    w, b = _meta(16, 256, dtype=torch.float32), _meta(16, dtype=torch.float32)
    cfg = TileConfig(16, 256, 16, use_dot=False, max_programs=2 * profile.multiprocessors, num_warps=8, num_stages=3)
    plan, _ = linear_mse_grad.plan_linear_mse_partials(x, w, b, t, config=cfg, profile=profile)
    return [Case(regime="probe 16x256x16", kernel="grad-fma", dtype="fp32", precision="ieee", plan=plan, hot=False,
                 memory_bound=False, tile_bytes=16 * 272 * 4, tensor_core=False)]


def formulation_cases(profile) -> list[Case]:
    """The rows and chunks formulations (kernels/formulations.py) on the full-batch regimes, fp32 and
    bf16, IEEE, where each serves the shape: the gradient pass and inference; and the mma gradient
    formulation (bf16 X on tensor cores) in bf16's default precision, tf32x3."""
    from linreg_fused.kernels import formulations
    from linreg_fused.kernels.config import formulation_serves

    cases: list[Case] = []
    for regime in (r for r in REGIMES if r.gpu and r.kind in ("step", "inference") and r.batch_size is None):
        n, d, o = regime.n_rows, regime.in_features, regime.out_features
        dtype_name, dt = regime.dtype_name, regime.dtype
        elem = torch.finfo(dt).bits // 8
        kind = "grad" if regime.kind == "step" else "forward"
        for name in ("rows", "chunks", "mma"):
            precision = "tf32x3" if name == "mma" else "ieee"
            if formulation_serves(name, d, o, torch.float32, precision, dt, kind):
                continue
            x, t, w, b = _meta(n, d, dtype=dt), _meta(n, o, dtype=dt), _meta(o, d, dtype=torch.float32), \
                _meta(o, dtype=torch.float32)
            if kind == "grad":
                plan, _ = formulations.plan_grad_partials(x, w, b, t, input_precision=precision, formulation=name,
                                                          profile=profile)
                fmas, moved = 2 * n * d * o, n * (d + o) * elem
            else:
                plan, _ = formulations.plan_forward(x, w, b, out_dtype=torch.float32, formulation=name,
                                                    profile=profile)
                fmas, moved = n * d * o, n * d * elem + n * o * 4
            c = plan.constexprs
            rows = c.get("ROWS") or c["BLOCK_N"]
            tile = rows * (d + (o if kind == "grad" else 0)) * elem
            tensor_core = name == "mma"  # its products are MMAs: no FMA-bound share to hold it to
            cases.append(Case(regime=regime.name, kernel=kind, dtype=dtype_name, precision=precision, plan=plan,
                              hot=True, memory_bound=True, tile_bytes=tile, tensor_core=tensor_core,
                              formulation=name, loop_trips=-(-n // rows), bytes_moved=moved,
                              fmas=0 if tensor_core else fmas))
    return cases


def all_cases(arch: Arch) -> list[Case]:
    from linreg_fused.kernels.config import DeviceProfile

    # What device_profile() reads from a card of this architecture.
    profile = DeviceProfile(gpu=True, multiprocessors=arch.multiprocessors, shared_per_block=arch.shared_per_block,
                            shared_per_sm=arch.shared_per_sm)
    cases: list[Case] = []
    fp64_done: set[tuple] = set()
    for regime in (r for r in REGIMES if r.gpu):
        shape = (regime.kind, regime.n_rows, regime.in_features, regime.out_features, regime.batch_size)
        dtypes = [regime.dtype_name]
        if shape not in fp64_done:
            fp64_done.add(shape)
            dtypes.append("fp64")
        for dtype_name in dtypes:
            precisions = ("ieee",) if dtype_name == "fp64" or regime.kind == "fit" else PRECISIONS
            for precision in precisions:
                cases += regime_cases(regime, dtype_name, precision, profile)
    return cases + probe_cases(profile) + formulation_cases(profile)


# Awkward shapes: D and O not multiples of any block, 1-sized dims (Triton makes an integer
# argument equal to 1 a constant), D beyond one block, O beyond one block of the forward,
# every dtype and precision. (N, D, O, dtype, precision, bias); N = 1 also gives n_rows = 1.
SHAPES = (
    (1, 1, 1, "fp32", "ieee", True), (517, 300, 33, "fp32", "ieee", False), (50001, 700, 70, "fp32", "tf32", True),
    (10001, 1000, 200, "fp32", "ieee", True), (517, 3, 2, "bf16", "tf32", False),
    (517, 1500, 257, "fp32", "tf32x3", False), (517, 4100, 1, "bf16", "ieee", True),
    (517, 1000, 200, "fp32", "tf32x3", True), (517, 700, 70, "fp64", "ieee", True),
    (517, 4100, 257, "fp64", "ieee", False),
)


def shape_cases(arch: Arch) -> list[Case]:
    """The launches the helpers choose for SHAPES: gradient and forward on every shape, the
    reduce-update where its specialisation differs (1-sized, fp64), the fused fit and the
    statistics kernels at 1-sized dims."""
    from linreg_fused.kernels import fused_fit, linear_forward, linear_mse_grad, linear_stats, reduce_update, stats_sgd
    from linreg_fused.kernels.config import DeviceProfile
    from linreg_fused.kernels.plan import LaunchPlan
    from linreg_fused.kernels.specs import ColumnTarget, SGDHyper

    profile = DeviceProfile(gpu=True, multiprocessors=arch.multiprocessors, shared_per_block=arch.shared_per_block,
                            shared_per_sm=arch.shared_per_sm)
    cases: list[Case] = []
    for n, d, o, dtype_name, precision, has_bias in SHAPES:
        dt = _DTYPES[dtype_name]
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        common = dict(regime=f"{n}x{d}x{o}{'' if has_bias else ' nobias'}", dtype=dtype_name, precision=precision,
                      hot=False, memory_bound=False, tile_bytes=0)
        x, t, w = _meta(n, d, dtype=dt), _meta(n, o, dtype=dt), _meta(o, d, dtype=pdt)
        b = _meta(o, dtype=pdt) if has_bias else None
        grad, partials = linear_mse_grad.plan_linear_mse_partials(x, w, b, t, input_precision=precision,
                                                                  profile=profile)
        tc = grad.constexprs["USE_DOT"] and precision != "ieee"
        cases.append(Case(kernel="grad", plan=grad, tensor_core=tc, **common))
        forward, _ = linear_forward.plan_linear_forward(x, w, b, out_dtype=pdt, input_precision=precision,
                                                        profile=profile)
        cases.append(Case(kernel="forward", plan=forward, tensor_core=tc, **common))
        if n == 1 or dt == torch.float64:
            targets = [ColumnTarget(0, w, SGDHyper(0.1, momentum=0.9), _meta(o, d, dtype=pdt))]
            targets += [ColumnTarget(o * d, b, SGDHyper(0.1))] if b is not None else []
            update = reduce_update.plan_reduce_update(partials.buffer, targets, scale=1.0, loss_out=_meta(dtype=pdt),
                                                      loss_column=partials.loss_column, profile=profile)
            cases.append(Case(kernel="update", plan=update, tensor_core=False, **common))
    # The fused fit and the statistics epochs at N = D = O = batch = 1 (every integer argument 1).
    common = dict(regime="1x1x1", dtype="fp32", precision="ieee", hot=False, memory_bound=False, tile_bytes=0,
                  tensor_core=False)
    x, t, w, b = _meta(1, 1, dtype=torch.float32), _meta(1, 1, dtype=torch.float32), _meta(1, 1, dtype=torch.float32), \
        _meta(1, dtype=torch.float32)
    fit = fused_fit.plan_fit_small(x, t, w, b, None, None, _meta(1, 1, dtype=torch.int64),
                                   _meta(1, 2, dtype=torch.float32), batch_size=1, mean=True,
                                   weight_hyper=SGDHyper(0.1), bias_hyper=SGDHyper(0.1), init_weight_buffer=False,
                                   init_bias_buffer=False, profile=profile)
    cases.append(Case(kernel="fit", plan=fit, **common))
    f64 = _meta(1, dtype=torch.float64)
    epochs = dict(mean_x_ptr=f64, mean_t_ptr=f64, m_xx_ptr=f64, m_tx_ptr=f64, m_tt_ptr=f64,
                  hyper_ptr=_meta(8, dtype=torch.float64), history_ptr=_meta(1, dtype=torch.float32),
                  w_ptr=w, b_ptr=b, w_buf_ptr=w, b_buf_ptr=b, w_state_ptr=_meta(2, 1, 1, dtype=torch.float32),
                  b_state_ptr=_meta(2, 1, dtype=torch.float32), w_buf_state_ptr=_meta(2, 1, 1, dtype=torch.float32),
                  b_buf_state_ptr=_meta(2, 1, dtype=torch.float32), n_rows=1, D=1, O=1, n_epochs=1)
    flags = dict(HAS_BIAS=True, UPDATE_W=True, UPDATE_B=True, MEAN=True, W_FLAGS=15, B_FLAGS=15,
                 INIT_W_BUFFER=True, INIT_B_BUFFER=True, **stats_sgd.epoch_blocks(1, 1))
    cases.append(Case(kernel="stats-epochs", plan=LaunchPlan(stats_sgd._stats_sgd_kernel, (1,), epochs, flags,
                                                             stats_sgd.EPOCH_WARPS, 1), **common))
    return cases
