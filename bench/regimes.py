"""The benchmark regimes: problem shapes and dtypes, defined once for the
pytest-benchmark suite (bench/test_bench.py), the GPU check (bench/gpu_check.py)
and the compile report. Plain data: importing this needs torch only."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Regime:
    """One problem shape: a benchmark group per (regime, dtype)."""

    name: str
    kind: str  # "fit" (tutorial loop), "step" (one step per batch), "inference"
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


FP32, BF16 = torch.float32, torch.bfloat16
TUTORIAL = dict(n_rows=15, in_features=3, out_features=2, batch_size=5, dtype=FP32, lr=1e-5)

REGIMES: list[Regime] = [
    # GPU: the regimes of the project's performance brief.
    Regime("tutorial", "fit", gpu=True, epochs=100, **TUTORIAL),
    *(Regime("minibatch", "step", 65536, 256, 16, 1024, dt, 0.05, gpu=True) for dt in (FP32, BF16)),
    *(Regime(name, "step", n, d, o, None, dt, 0.1, gpu=True)
      for dt in (FP32, BF16)
      for name, n, d, o in (("tall", 4_194_304, 64, 4), ("wide", 1_048_576, 256, 16), ("deep", 262_144, 1024, 8))),
    *(Regime(f"inference-{name}", "inference", n, d, o, None, FP32, 0.0, gpu=True)
      for name, n, d, o in (("tall", 4_194_304, 64, 4), ("wide", 1_048_576, 256, 16), ("deep", 262_144, 1024, 8))),
    # CPU: tiny shapes; the interpreter runs a kernel in ~10-100 ms.
    Regime("tutorial", "fit", gpu=False, epochs=10, **TUTORIAL),
    *(Regime("small", "step", 256, 16, 4, None, dt, 0.1, gpu=False) for dt in (FP32, BF16)),
    Regime("inference-small", "inference", 256, 16, 4, None, FP32, 0.0, gpu=False),
]


# ---------------------------------------------------------------- statistics (linreg_fused.stats)
# Full-batch training from sufficient statistics: one pass over X and T, then `epochs`
# epochs on the (D+1)² statistics. bench/test_bench_stats.py times these against a pass
# per epoch and eager PyTorch; bench/compile_stats.py compiles their kernels for sm_90.
STATS_REGIMES: list[Regime] = [
    *(Regime(f"stats-{name}", "statistics", n, d, o, None, dt, 0.1, gpu=True, epochs=100)
      for dt in (FP32, BF16)
      for name, n, d, o in (("tall", 4_194_304, 64, 4), ("wide", 1_048_576, 256, 16), ("deep", 262_144, 1024, 8))),
    Regime("stats-small", "statistics", 256, 16, 4, None, FP32, 0.1, gpu=False, epochs=10),
]
