"""The benchmark regimes and their peers, defined once for the pytest-benchmark
suite (bench/test_bench.py), the GPU check (bench/gpu_check.py) and the compile
report. Plain data: importing this needs torch only.

A regime is a problem shape and dtype; its peers are the ways of training (or
running) it that are timed against each other:

    eager            nn.Linear + F.mse_loss + backward + torch.optim.SGD (the baseline)
    eager-sgd-fused  the same with optim.SGD(fused=True)
    eager-cudagraph  the eager step captured in a CUDA graph and replayed (GPU only)
    eager-compile    the eager step under torch.compile (GPU only)
    fused            FusedLinearRegressor.train_step with FusedSGD (one fused step)
    fused-tf32       the same with input_precision="tf32" (GPU, fp32 only)
    fused-tf32x3     the same with input_precision="tf32x3" (GPU, fp32 full batch)
    fused-fit        FusedLinearRegressor.fit (the persistent kernel where it applies)

bf16 regimes keep fp32 master weights: the baseline is eager under
torch.autocast(bf16) ("eager-autocast"), with pure-bf16 eager
("eager-pure-bf16") as a further peer. Inference regimes compare
``model(x)`` with nn.Linear. Without a GPU the fused peers run twice: on the
pure-PyTorch reference backend ("[torch]") and through Triton's interpreter
("[triton-interp]").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Regime:
    """One problem shape: a benchmark group per (regime, dtype)."""

    name: str
    kind: str  # "fit" (a whole training loop), "step" (one step per batch), "inference"
    n_rows: int
    in_features: int
    out_features: int
    batch_size: int | None  # None: full batch
    dtype: torch.dtype
    lr: float
    gpu: bool  # True: runs on a GPU only; False: the tiny CPU version
    epochs: int = 1  # "fit": epochs per timed call

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def shape(self) -> str:
        batch = "full" if self.batch_size is None else f"batch {self.batch_size}"
        return f"{self.n_rows}x{self.in_features}->{self.out_features} {batch}"

    @property
    def group(self) -> str:
        where = "" if self.gpu else " [cpu]"
        return f"{self.name} {self.dtype_name} {self.shape}{where}"

    @property
    def rows_per_step(self) -> int:
        return self.batch_size or self.n_rows

    @property
    def steps_per_call(self) -> int:
        if self.kind == "fit":
            return self.epochs * math.ceil(self.n_rows / self.batch_size)
        if self.batch_size is None:
            return 1  # one full-batch step (or forward) on one input set
        return math.ceil(self.n_rows / self.batch_size)  # one epoch over one input set

    @property
    def set_bytes(self) -> int:
        return self.n_rows * (self.in_features + self.out_features) * torch.finfo(self.dtype).bits // 8

    @property
    def bytes_per_step(self) -> int:
        """One read of X and T (training) or of X plus the write of Y (inference), as the performance brief counts."""
        return self.rows_per_step * (self.in_features + self.out_features) * torch.finfo(self.dtype).bits // 8

    @property
    def flops_per_step(self) -> int:
        """Multiply-adds x 2 of the products: X·Wᵀ, and for training Rᵀ·X too (4·N·D·O)."""
        products = 1 if self.kind == "inference" else 2
        return 2 * products * self.rows_per_step * self.in_features * self.out_features


FP32, BF16 = torch.float32, torch.bfloat16
TUTORIAL = dict(n_rows=15, in_features=3, out_features=2, batch_size=5, dtype=FP32, lr=1e-5)
MINIBATCH = dict(n_rows=65536, in_features=256, out_features=16, batch_size=1024, lr=0.05)
FULL_BATCH = (("tall", 4_194_304, 64, 4), ("wide", 1_048_576, 256, 16), ("deep", 262_144, 1024, 8))

REGIMES: list[Regime] = [
    # GPU: the regimes of the project's performance brief.
    Regime("tutorial", "fit", gpu=True, epochs=100, **TUTORIAL),
    *(Regime("minibatch", "step", dtype=dt, gpu=True, **MINIBATCH) for dt in (FP32, BF16)),
    # Several shuffled epochs per call: fit's CUDA-graph replay (captured after its first epoch)
    # against eager and CUDA-graphed PyTorch over the same steps.
    Regime("minibatch-fit", "fit", dtype=FP32, gpu=True, epochs=10, **MINIBATCH),
    *(Regime(name, "step", n, d, o, None, dt, 0.1, gpu=True) for dt in (FP32, BF16) for name, n, d, o in FULL_BATCH),
    *(Regime(f"inference-{name}", "inference", n, d, o, None, FP32, 0.0, gpu=True) for name, n, d, o in FULL_BATCH),
    # Several O tiles: the inference kernel's grid tiles O (BLOCK_O <= 64 today: 200 is 4 tiles).
    Regime("inference-manyout", "inference", 1_048_576, 64, 200, None, FP32, 0.0, gpu=True),
    # CPU: tiny shapes; the interpreter runs a kernel launch in ~10-100 ms.
    Regime("tutorial", "fit", gpu=False, epochs=3, **TUTORIAL),
    # Batches too big for fit's one-program kernel (64·32·8 padded elements): fit's per-batch path.
    Regime("minibatch", "step", 192, 24, 5, 64, FP32, 0.05, gpu=False),
    *(Regime("small", "step", 256, 16, 4, None, dt, 0.1, gpu=False) for dt in (FP32, BF16)),
    Regime("inference-small", "inference", 256, 16, 4, None, FP32, 0.0, gpu=False),
    Regime("inference-manyout", "inference", 64, 16, 100, None, FP32, 0.0, gpu=False),  # 2 O tiles
]


# ------------------------------------------------------------------ peers
@dataclass(frozen=True)
class Peer:
    name: str
    family: str  # "eager" | "graph" | "compile" | "fused" | "fused-fit" | "nn.Linear" | "fused-forward"
    baseline: bool = False
    gpu_only: bool = False
    backend: str = "triton"  # fused peers: linreg_fused backend
    precision: str = "auto"  # fused peers: input_precision ("auto": ieee for fp32, tf32x3 for bf16 inputs)
    numerics: str = "fp32"  # what its check against float64 allows (bench/harness.py TOLERANCES)
    sgd_fused: bool = False
    eager_mode: str = "fp32"  # "fp32" | "autocast" | "pure-bf16"

    @property
    def is_fused(self) -> bool:
        return self.family in ("fused", "fused-fit", "fused-forward")


def _fused_variants(family: str, name: str, numerics: str, on_gpu: bool) -> list[Peer]:
    """On a GPU the Triton kernels; on the CPU the reference backend and the interpreter."""
    if on_gpu:
        return [Peer(name, family, numerics=numerics)]
    return [Peer(f"{name}[torch]", family, backend="torch", numerics=numerics),
            Peer(f"{name}[triton-interp]", family, backend="triton", numerics=numerics)]


def peers_for(regime: Regime, on_gpu: bool) -> list[Peer]:
    """The peers of one group, the baseline first (speedups are computed against it).
    GPU-only peers are listed on the CPU too, and skipped there with a reason."""
    if regime.kind == "inference":
        return [Peer("nn.Linear", "nn.Linear", baseline=True),
                *_fused_variants("fused-forward", "fused-forward", "fp32", on_gpu)]
    if regime.dtype == BF16:
        eager = [Peer("eager-autocast", "eager", baseline=True, eager_mode="autocast", numerics="autocast"),
                 Peer("eager-autocast-sgd-fused", "eager", sgd_fused=True, eager_mode="autocast", numerics="autocast"),
                 Peer("eager-pure-bf16", "eager", eager_mode="pure-bf16", numerics="pure-bf16"),
                 Peer("eager-autocast-cudagraph", "graph", gpu_only=True, eager_mode="autocast", numerics="autocast"),
                 Peer("eager-autocast-compile", "compile", gpu_only=True, eager_mode="autocast", numerics="autocast")]
        fused_numerics = "bf16-in-fp32"
    else:
        eager = [Peer("eager", "eager", baseline=True),
                 Peer("eager-sgd-fused", "eager", sgd_fused=True),
                 Peer("eager-cudagraph", "graph", gpu_only=True),
                 Peer("eager-compile", "compile", gpu_only=True)]
        fused_numerics = "fp32"
    if regime.kind == "fit":
        return [*eager, *_fused_variants("fused-fit", "fused-fit", "fp32", on_gpu),
                *_fused_variants("fused", "fused-step-loop", "fp32", on_gpu)]
    fused = _fused_variants("fused", "fused", fused_numerics, on_gpu)
    if regime.dtype == FP32:
        # TF32 exists on GPUs only; the interpreter would run the same IEEE products as "fused".
        fused.append(Peer("fused-tf32", "fused", gpu_only=True, precision="tf32", numerics="tf32"))
        if regime.batch_size is None:  # fp32's accuracy on tensor cores: where FMAs are the bound
            fused.append(Peer("fused-tf32x3", "fused", gpu_only=True, precision="tf32x3", numerics="fp32"))
    if regime.batch_size is not None:
        fused += _fused_variants("fused-fit", "fused-fit", fused_numerics, on_gpu)
    return [*eager, *fused]


def skip_reason(regime: Regime, peer: Peer, on_gpu: bool) -> str | None:
    """Why (regime, peer) does not run on this machine, or None."""
    if regime.gpu and not on_gpu:
        return f"GPU regime ({regime.shape}): needs CUDA; this run has the tiny CPU regimes"
    if not regime.gpu and on_gpu:
        return "CPU-only tiny regime; the GPU run has the full-size regimes"
    if peer.gpu_only and not on_gpu:
        what = {"graph": "CUDA graphs", "compile": "torch.compile peers (timed against GPU kernels only)",
                "fused": "TF32 (a GPU tensor-core mode)"}[peer.family]
        return f"{peer.name} is GPU-only: {what}"
    return None


def regimes_for(on_gpu: bool) -> list[Regime]:
    """The regimes that run on this machine: the full-size ones on a GPU, the tiny ones without."""
    return [r for r in REGIMES if r.gpu == on_gpu]


# ---------------------------------------------------------------- statistics (linreg_fused.stats)
# Full-batch training from sufficient statistics: one pass over X and T, then `epochs`
# epochs on the (D+1)² statistics. bench/test_bench_stats.py times these against a pass
# per epoch and eager PyTorch; bench/compile_stats.py compiles their kernels for sm_90.
STATS_REGIMES: list[Regime] = [
    *(Regime(f"stats-{name}", "statistics", n, d, o, None, dt, 0.1, gpu=True, epochs=100)
      for dt in (FP32, BF16)
      for name, n, d, o in (("tall", 4_194_304, 64, 4), ("wide", 1_048_576, 256, 16), ("deep", 262_144, 1024, 8))),
    Regime("stats-small", "statistics", 128, 8, 2, None, FP32, 0.1, gpu=False, epochs=5),
]
