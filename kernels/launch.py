"""Cheap repeat launches of a planned kernel.

``kernel[grid](**args)`` goes through Triton's ``JITFunction.run`` on every
call: it binds the arguments, specialises each one (dtype, 16-byte alignment
of pointers, integers equal to 1 or divisible by 16), formats a cache key
from them and the options, looks the compiled kernel up and builds launch
metadata: 20-30 µs of host time for a kernel the GPU may run in 5 µs.

``FastLaunch`` keeps a plan's fixed arguments and constants, launches the
first time through Triton's normal path, and keeps the compiled kernel it
returns. Later launches with new values for the leading ``varying``
arguments go straight to that kernel's launcher (``CompiledKernel.run``,
which still allocates the scratch memory the kernel asks for), as long as
what Triton specialised on is unchanged: the device, and the dtype and
16-byte alignment of each varying tensor (every other argument is fixed, so
its specialisation is too). Anything else takes the normal path again: a
tensor of another alignment (its kernel is then kept as well), launch
hooks set by a profiler (Triton then builds launch metadata for them), and
Triton's interpreter (nothing is compiled there).
"""

from __future__ import annotations

from typing import Any

import torch

from .plan import LaunchPlan


class FastLaunch:
    """``plan``'s kernel, relaunched with new values of its first ``varying`` runtime arguments.

    The kernel's parameters must list the varying ones first and the
    compile-time constants last (the project's kernels are written so).
    Float arguments must stay floats and tensors keep their dtype."""

    def __init__(self, plan: LaunchPlan, varying: int) -> None:
        names = list(plan.kernel.arg_names)
        runtime = [n for n in names if n in plan.args]
        constants = [n for n in names if n in plan.constexprs]
        if names != runtime + constants or len(runtime) != len(plan.args):
            raise ValueError(f"{plan.kernel}: FastLaunch needs the runtime parameters first, then the constants")
        self.kernel, self.grid = plan.kernel, plan.grid
        self.options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
        self.varying = tuple(runtime[:varying])
        self.tail = tuple(plan.args[n] for n in runtime[varying:]) + tuple(plan.constexprs[n] for n in constants)
        first = [plan.args[n] for n in self.varying]
        slots = [i for i, v in enumerate(first) if isinstance(v, torch.Tensor)]
        self._key = _key_function(slots, [first[i].dtype for i in slots])
        self.grid3 = (tuple(plan.grid) + (1, 1))[:3]
        self._compiled: dict[tuple, Any] = {}  # (device, alignment bits) -> a launch of the compiled kernel
        self._driver = None
        self._knobs = None

    def __call__(self, *values: Any) -> None:
        driver = self._driver
        if driver is not None:
            bits = self._key(values)
            runtime = self._knobs
            # Launch hooks (a profiler's): None, or Triton 3.9's HookChain with no calls, means none.
            if bits is not None and not getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook) \
                    and not getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook):
                device = driver.get_current_device()
                launch = self._compiled.get((device, bits))
                if launch is not None:
                    launch(driver.get_current_stream(device), values + self.tail)
                    return
        self.launch_normally(*values)

    def launch_normally(self, *values: Any) -> None:
        """Through Triton's JITFunction.run (the interpreter's run under TRITON_INTERPRET); keeps what it compiled."""
        compiled = self.kernel[self.grid](*values, *self.tail, **self.options)
        if compiled is None or not hasattr(compiled, "packed_metadata"):  # the interpreter: nothing compiled
            return
        from triton import knobs
        from triton.runtime import driver

        self._driver, self._knobs = driver.active, knobs.runtime
        bits = self._key(values)
        if bits is not None:
            self._compiled[(self._driver.get_current_device(), bits)] = _launcher(compiled, self.grid3)


def _key_function(slots: list[int], dtypes: list[torch.dtype]):
    """values -> the 16-byte alignment bits of the tensors at ``slots``, or None if one changed dtype.
    Straight-line code (as Triton's own binder is), built once per launch: a loop costs twice as much."""
    if not slots:
        return lambda values: 0
    names = [f"t{i}" for i in range(len(slots))]
    body = [f"def key(values, {', '.join(f'd{i}=d{i}' for i in range(len(slots)))}):"]
    body += [f"    {n} = values[{s}]" for n, s in zip(names, slots)]
    body.append(f"    if {' or '.join(f'{n}.dtype is not d{i}' for i, n in enumerate(names))}:")
    body.append("        return None")
    body.append("    return " + " | ".join(f"((({n}.data_ptr() & 15) == 0) << {i})" for i, n in enumerate(names)))
    namespace = {f"d{i}": d for i, d in enumerate(dtypes)}
    exec("\n".join(body), namespace)
    return namespace["key"]


def _launcher(compiled, grid3: tuple[int, int, int]):
    """(stream, args) -> launch of a compiled kernel. Through its launcher object (which allocates
    the scratch memory the kernel asks for); straight to the driver's C launch function when the
    launcher is Triton's CudaLauncher and the kernel needs no scratch (half the host time)."""
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    gx, gy, gz = grid3
    needed = ("launch", "arg_annotations", "kernel_signature", "launch_cooperative_grid", "launch_pdl",
              "global_scratch_size", "profile_scratch_size")
    direct = (type(run).__name__ == "CudaLauncher" and all(hasattr(run, a) for a in needed)
              and run.global_scratch_size == 0 and run.profile_scratch_size == 0
              and not getattr(run, "gsan_enabled", False))
    if not direct:
        return lambda stream, args: run(gx, gy, gz, stream, function, metadata, None, None, None, *args)
    c_launch, annotations, signature = run.launch, run.arg_annotations, run.kernel_signature
    cooperative, pdl = run.launch_cooperative_grid, run.launch_pdl
    return lambda stream, args: c_launch(gx, gy, gz, stream, function, cooperative, pdl, metadata, None, None, None,
                                         None, None, annotations, signature, args)
