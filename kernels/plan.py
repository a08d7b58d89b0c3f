"""A kernel launch, decided but not yet run.

Every launch helper is split in two: ``plan_*`` decides the kernel, grid,
arguments, compile-time constants, warps and pipeline stages (and allocates
the outputs), and ``LaunchPlan.launch`` runs it. The compile report
(bench/compile_report.py) compiles the very plans the helpers would launch,
so there is one copy of the configuration logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LaunchPlan:
    kernel: Any  # a @triton.jit function
    grid: tuple[int, ...]
    args: dict[str, Any]  # runtime arguments by parameter name: tensors, ints, floats
    constexprs: dict[str, Any]  # compile-time constants by parameter name
    num_warps: int
    num_stages: int

    def launch(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)
