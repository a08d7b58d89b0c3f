"""A kernel launch, decided but not yet run.

Every launch helper is split in two: ``plan_*`` decides the kernel, grid,
arguments, compile-time constants, warps and pipeline stages (and allocates
the outputs), and ``LaunchPlan.launch`` runs it. The compile report
(bench/compile_report.py) compiles the very plans the helpers would launch,
so there is one copy of the configuration logic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, TypeVar

from .config import DeviceProfile, smaller_config

Config = TypeVar("Config")


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


def shared_bytes(plan: LaunchPlan) -> int:
    """Shared memory per program of the kernel ``plan`` launches: compiles it (Triton's
    warmup: the launcher's own specialisation, cached for the launch) without running it."""
    compiled = plan.kernel.warmup(**plan.args, **plan.constexprs, grid=plan.grid, num_warps=plan.num_warps,
                                  num_stages=plan.num_stages)
    return compiled.metadata.shared


_FITTED: dict[Hashable, Any] = {}  # plan key -> the config that fits the device


def fitted(make: Callable[[Config], tuple], config: Config, profile: DeviceProfile, device: Any, key: Hashable) -> tuple:
    """``make(config)`` (a plan and its outputs), with a config whose kernel fits the device's shared memory.

    config.py's estimates should make the first config fit; should a compiled kernel still need
    more than the device has (Triton would raise OutOfResources at its first launch), fewer
    pipeline stages, then fewer rows are tried. Each new key compiles once; later calls only
    look the fitting config up. On the interpreter (no shared memory limit), or when planning for a
    GPU with tensors elsewhere (the compile report's meta tensors), nothing is compiled here.
    """
    if not profile.gpu or getattr(device, "type", None) != "cuda":
        return make(config)
    known = _FITTED.get(key)
    if known is not None:
        return make(known)
    from triton.runtime.errors import OutOfResources

    tried = config
    while tried is not None:
        planned = make(tried)
        try:
            shared = shared_bytes(planned[0])
        except OutOfResources:
            shared = None
        except Exception:  # this Triton cannot compile ahead (e.g. another warmup API): launch as planned,
            _FITTED[key] = tried  # where any real error surfaces at the launch itself
            return planned
        if shared is not None and shared <= profile.shared_per_block:
            _FITTED[key] = tried
            return planned
        tried = smaller_config(tried)
    raise RuntimeError(f"no configuration from {config} fits {profile.shared_per_block} B of shared memory")
