"""What the benchmark suite (bench/test_bench.py) and the GPU check
(bench/gpu_check.py) share: each regime's data, the float64 references and
the check against float64. The regimes and peers are in bench/regimes.py,
one runner per peer (set up, a checked epoch, the timed call, the steady
loop's unit) in bench/runners.py.

This imports linreg_fused: without CUDA, TRITON_INTERPRET must be set before
the first import (bench/conftest.py and ``gpu_check.py --cpu-smoke`` do).

Inputs are random (targets from a linear map plus noise), never zeros, except
the tutorial's real crop-yield data.

Correctness, before any timing: each peer is reset to the same initial
weights and runs one epoch (``Runner.check_epoch``) over SHUFFLED batches: a
row order drawn here from a seeded generator, rows gathered through it, the
same order for the float64 reference. Exceptions, each for a reason:
full-batch steps read all rows in place (one batch: the order of its rows
changes only rounding, and gathering a 1 GB input would double the memory);
``fit`` draws its own row orders, so the fused-fit peer runs fit with
shuffling on and the reference follows the orders fit drew (recorded as fit
makes them), over three epochs when the timed call runs three or more (so
fit's CUDA-graph replay is checked too); the CUDA-graphed eager step of a
"step" regime replays graphs captured on fixed batches, so it is checked in
row order. The mean loss and the parameter update are compared with float64
SGD over the same batches, from the same initial parameters (as the peer
stores them: bf16 for the pure-bf16 peer), within TOLERANCES.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from linreg_fused.backend import select_ops
from linreg_fused.data import crop_yields
from regimes import Peer, Regime

if TYPE_CHECKING:  # bench/runners.py imports this module, not the other way round
    from runners import Runner

CHECK_SEED = 4321  # the check epoch's row order
DATA_SEED = 1234

BF16_ROUNDOFF = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits, round to nearest)

# Tolerances of the pre-timing check against float64, per numerics:
# (relative error of the mean loss, norm-relative error of the parameter update).
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (2e-5, 1e-4),          # IEEE fp32 products, fp32 accumulation (honest errors ~1e-7)
    # bf16 X/T, fp32 master weights; products "tf32x3" (X exact in TF32, W and R in two TF32 parts).
    "bf16-in-fp32": (2e-5, 1e-4),
    "tf32": (1e-2, 5e-2),         # 10-bit mantissa products
    # bf16 GEMMs with bf16 outputs, fp32 weights: dW is rounded to bf16 (u = 2^-8 relative).
    # Measured on the CPU, at the GPU shapes too: loss <= 1.4e-4, update <= 2.3e-3 (0.6 u).
    "autocast": (5e-3, 2e-2),
    # bf16 weights too: the update tolerance is pure_bf16_update_tol (it depends on |W| / |dW|).
    # Loss: 5 u; measured <= 2.1e-3.
    "pure-bf16": (2e-2, math.nan),
}
FORWARD_TOL = 1e-4  # inference, fp32 IEEE: honest errors ~1e-7


def pure_bf16_update_tol(w_ref: torch.Tensor, delta_ref: torch.Tensor, steps: int) -> float:
    """Update tolerance of a peer that keeps its weights in bf16: 2u·(1 + √S·|W|/|dW|).
    Every step rounds each stored weight to bf16 (error <= u·|w|, u = 2^-8), so after S steps
    the weights carry ~√S·u·|W| of rounding (independent errors add in quadrature), which
    is large next to a small update |dW| (one full-batch step of "wide" moves W by 1/33 of
    its norm); the u term covers the bf16 gradient. Measured on the CPU at the GPU shapes
    ("tall", "wide", "deep", "minibatch") and "small": 0.33-0.38 u·(1 + √S·|W|/|dW|), i.e.
    errors of 0.9e-2 to 4.9e-2 against tolerances of 0.054 to 0.26. A dropped, doubled or
    misdirected step is off by O(1)."""
    return 2 * BF16_ROUNDOFF * (1 + math.sqrt(steps) * float(w_ref.norm() / delta_ref.norm()))


# ------------------------------------------------------------------ data
@dataclass
class Data:
    """A regime's inputs, the shared initial weights and the check epoch's row order."""

    regime: Regime
    sets: list[tuple[torch.Tensor, torch.Tensor]]  # (X, T) input sets; successive calls cycle through them
    w0: torch.Tensor  # fp32 (O, D)
    b0: torch.Tensor  # fp32 (O,)
    check_order: torch.Tensor | None  # row order of the check epoch (None: full batch, rows in place)
    references: dict = field(default_factory=dict)  # float64 results, computed once per key

    @property
    def x(self) -> torch.Tensor:
        return self.sets[0][0]

    @property
    def t(self) -> torch.Tensor:
        return self.sets[0][1]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def call_batches(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of a "step" regime's timed call on input set k: one epoch in row order (views)."""
        r = self.regime
        x, t = self.sets[k]
        bs = r.rows_per_step
        return [(x[s : s + bs], t[s : s + bs]) for s in range(0, r.n_rows, bs)]

    def batches(self, order: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of set 0: rows gathered through ``order`` (copies), or in place in row order."""
        if order is None:
            return self.call_batches(0)
        bs = self.regime.rows_per_step
        return [(self.x[idx], self.t[idx]) for idx in order.split(bs)]


_CPU_CACHE_BYTES = 32 << 20  # nominal last-level cache for the CPU runs


def n_input_sets(regime: Regime, device: torch.device) -> int:
    """How many input sets to rotate through so that one call's data is not in cache from the last."""
    if regime.kind == "fit":
        return 1
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    else:
        cache = _CPU_CACHE_BYTES
    if regime.set_bytes >= 3 * cache:
        return 1
    return min(8, math.ceil(3 * cache / regime.set_bytes))


def make_data(regime: Regime, device: torch.device, n_sets: int | None = None) -> Data:
    """Random inputs (never zeros), targets from a known linear map plus noise. n_sets: input sets to
    rotate through (default: enough to defeat the last-level cache, see n_input_sets)."""
    gen = torch.Generator(device=device).manual_seed(DATA_SEED)
    n, d, o = regime.n_rows, regime.in_features, regime.out_features
    bound = 1 / math.sqrt(d)  # nn.Linear's init range
    w0 = (torch.rand((o, d), generator=gen, device=device) * 2 - 1) * bound
    b0 = (torch.rand((o,), generator=gen, device=device) * 2 - 1) * bound
    if regime.name == "tutorial":
        sets = [crop_yields(device=device)]
    else:
        w_true = torch.randn((o, d), generator=gen, device=device) * bound
        b_true = torch.randn((o,), generator=gen, device=device)
        sets = []
        for _ in range(n_sets or n_input_sets(regime, device)):
            x = torch.randn((n, d), generator=gen, device=device)
            t = torch.addmm(b_true, x, w_true.t()) + 0.1 * torch.randn((n, o), generator=gen, device=device)
            sets.append((x.to(regime.dtype), t.to(regime.dtype)))
    order = None
    if regime.batch_size is not None:
        order_gen = torch.Generator(device=device).manual_seed(CHECK_SEED)
        order = torch.randperm(n, generator=order_gen, device=device)
    return Data(regime, sets, w0, b0, order)


_DATA: dict[tuple[Regime, torch.device, int | None], Data] = {}


def data_for(regime: Regime, device: torch.device, n_sets: int | None = None) -> Data:
    """make_data, keeping one regime alive at a time (the GPU holds a single ~1 GB problem)."""
    key = (regime, device, n_sets)
    if key not in _DATA:
        _DATA.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        _DATA[key] = make_data(regime, device, n_sets)
    return _DATA[key]


# ------------------------------------------------------------------ float64 references
def _order_key(orders: list[torch.Tensor | None]) -> tuple:
    return tuple(None if o is None else hash(o.cpu().numpy().tobytes()) for o in orders)


def reference_epochs(data: Data, orders: list[torch.Tensor | None], w_init: torch.Tensor,
                     b_init: torch.Tensor) -> tuple[list[float], torch.Tensor, torch.Tensor]:
    """Float64 SGD (no momentum) from (w_init, b_init), one epoch per row order:
    (each epoch's mean batch loss, W, b)."""
    key = ("epochs", _order_key(orders), hash(w_init.cpu().numpy().tobytes()), hash(b_init.cpu().numpy().tobytes()))
    if key not in data.references:
        w, b = w_init.double(), b_init.double()
        means = []
        for order in orders:
            losses = []
            for xb, yb in data.batches(order):
                x64 = xb.double()
                r = torch.addmm(b, x64, w.t()) - yb.double()
                scale = 1.0 / r.numel()
                losses.append(float((r * r).sum()) * scale)
                w = w - data.regime.lr * (2 * scale) * (r.t() @ x64)
                b = b - data.regime.lr * (2 * scale) * r.sum(0)
            means.append(sum(losses) / len(losses))
        data.references[key] = (means, w, b)
    return data.references[key]


def reference_forward(data: Data) -> torch.Tensor:
    if "forward" not in data.references:
        data.references["forward"] = torch.addmm(data.b0.double(), data.x.double(), data.w0.double().t())
    return data.references["forward"]


def unavailable_reason(peer: Peer, device: torch.device) -> str | None:
    """Why a fused peer's backend cannot run here (e.g. Triton without a GPU or its interpreter)."""
    if peer.is_fused and peer.backend == "triton":
        try:
            select_ops("triton", device)
        except RuntimeError as err:
            return str(err)
    return None


# ------------------------------------------------------------------ the check
def check_against_reference(runner: Runner) -> dict[str, float]:
    """Reset, run the check epoch, compare with float64. Raises AssertionError beyond TOLERANCES;
    returns the errors and tolerances."""
    data, peer = runner.data, runner.peer
    if runner.regime.kind == "inference":
        err = runner.forward_check()
        assert err <= FORWARD_TOL, (
            f"{peer.name}: forward differs from float64 by {err:.3g} (norm-relative), tolerance {FORWARD_TOL}")
        return {"check_output_rel_err": err, "check_tol": FORWARD_TOL}
    runner.reset()
    w_init, b_init = (p.detach().double().clone() for p in runner.parameters())  # as the peer stores them
    losses, orders = runner.check_epoch()
    ref_losses, ref_w, ref_b = reference_epochs(data, orders, w_init, b_init)
    loss_tol, delta_tol = TOLERANCES[peer.numerics]
    loss_err = max(abs(a - r) / abs(r) if math.isfinite(a) else math.inf for a, r in zip(losses, ref_losses))
    assert loss_err <= loss_tol, (
        f"{peer.name}: epoch losses {losses} vs float64 {ref_losses} (rel err {loss_err:.3g} > {loss_tol})")
    w, b = (p.detach().double() for p in runner.parameters())
    assert torch.isfinite(w).all() and torch.isfinite(b).all(), f"{peer.name}: non-finite parameters"
    ref_delta = torch.cat([(ref_w - w_init).flatten(), ref_b - b_init])
    delta = torch.cat([(w - w_init).flatten(), b - b_init])
    delta_err = float((delta - ref_delta).norm() / ref_delta.norm())
    if peer.numerics == "pure-bf16":
        steps = len(orders) * math.ceil(data.regime.n_rows / data.regime.rows_per_step)
        delta_tol = pure_bf16_update_tol(torch.cat([ref_w.flatten(), ref_b]), ref_delta, steps)
    assert delta_err <= delta_tol, (
        f"{peer.name}: parameter update differs from float64 by {delta_err:.3g} (norm-relative) > {delta_tol}")
    return {"check_loss_rel_err": loss_err, "check_update_rel_err": delta_err,
            "check_loss_tol": loss_tol, "check_update_tol": delta_tol, "check_epochs": len(orders),
            "check_shuffled": orders[0] is not None}


def peak_extra_bytes(runner: Runner) -> tuple[int | None, int | None]:
    """(peak allocated bytes, peak minus what was allocated before) over one call; GPU only."""
    if runner.data.device.type != "cuda":
        return None, None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    runner.call()
    peak = torch.cuda.max_memory_allocated()
    return peak, peak - before
