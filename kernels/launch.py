"""Cheap repeat launches of a planned kernel.

``kernel[grid](**args)`` goes through Triton's ``JITFunction.run`` on every
call: it binds the arguments, specialises each one (dtype, 16-byte alignment
of pointers, integers equal to 1 or divisible by 16), formats a cache key
from them and the options, looks the compiled kernel up and builds launch
metadata: 17-30 µs of host time (docs/host-path.md) for a kernel the GPU
may run in 5 µs.

``FastLaunch`` keeps a plan's fixed arguments and constants, launches the
first time through Triton's normal path, and keeps the compiled kernel it
returns. Later launches with new values for the ``varying`` arguments go
straight to that kernel's launcher (``CompiledKernel.run``, which allocates
the scratch memory the kernel asks for; or, for a kernel without scratch,
the driver's C launch function that it calls, with tensors passed as their
addresses), as long as what Triton
specialised on is unchanged: the device, and the dtype and 16-byte
alignment of each varying tensor (every other argument is fixed, so its
specialisation is too). Anything else takes the normal path again: a tensor
of another alignment (its kernel is then kept too), another dtype, launch
hooks set by a profiler (Triton then builds launch metadata for them), and
Triton's interpreter (nothing is compiled there).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .plan import LaunchPlan


class FastLaunch:
    """``plan``'s kernel, relaunched with new values of the arguments named in ``varying``.

    ``fast(*values)`` takes the values in the order of ``varying``; a name may
    appear once, but several parameters may share a value with ``alias``
    (parameter -> varying name). Floats must stay floats, tensors keep
    their dtype (a new dtype goes through Triton's normal path)."""

    def __init__(self, plan: LaunchPlan, varying: Sequence[str], alias: dict[str, str] | None = None) -> None:
        self.kernel, self.grid = plan.kernel, plan.grid
        self.options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
        self.names = list(plan.kernel.arg_names)
        alias = dict(alias or {})
        unknown = [n for n in list(varying) + list(alias) if n not in plan.args]
        if unknown:
            raise ValueError(f"{plan.kernel}: not runtime arguments of the plan: {unknown}")
        self.values = {**plan.args, **plan.constexprs}  # every parameter's planned value
        self._prepare = _prepare_function(self.names, list(varying), alias, self.values)
        self._arguments = _arguments_function(self.names, list(varying), alias, self.values)
        self.grid3 = (tuple(plan.grid) + (1, 1))[:3]
        self._compiled: dict[tuple, Any] = {}  # (device, alignment bits) -> a launch of the compiled kernel
        self._driver = None
        self._knobs = None

    def __call__(self, *values: Any) -> None:
        bits, pointers = self._prepare(*values)
        driver = self._driver
        if driver is not None and bits is not None:
            runtime = self._knobs
            # Launch hooks (a profiler's): None, or Triton 3.9's HookChain with no calls, means none.
            if not getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook) \
                    and not getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook):
                device = driver.get_current_device()
                launch = self._compiled.get((device, bits))
                if launch is not None:
                    launch(driver.get_current_stream(device), pointers)
                    return
        self._launch_normally(bits, self._arguments(*values))

    def _launch_normally(self, bits: int | None, args: tuple) -> None:
        """Through Triton's JITFunction.run (the interpreter's run under TRITON_INTERPRET); keeps what it compiled."""
        compiled = self.kernel[self.grid](*args, **self.options)
        if compiled is None or not hasattr(compiled, "packed_metadata"):  # the interpreter: nothing compiled
            return
        from triton import knobs
        from triton.runtime import driver

        self._driver, self._knobs = driver.active, knobs.runtime
        if bits is not None:
            self._compiled[(self._driver.get_current_device(), bits)] = _launcher(compiled, self.grid3)


def _sources(names: list[str], varying: list[str], alias: dict[str, str], planned: dict,
             namespace: dict, pointers: bool) -> str:
    """An expression of every parameter's value in order: a varying value ``v<i>`` (``p<i>``, its
    address, for a tensor when ``pointers``), the constants between them as pre-built tuples
    (``c<j>``, in namespace; a fixed tensor as its address when ``pointers``: the C launcher takes
    an address as it is, without calling data_ptr())."""
    index = {name: i for i, name in enumerate(varying)}
    parts, constants, values = [], [], []

    def close(kind):  # a run of constants, or of varying values, ends
        if kind == "constants" and constants:
            namespace[f"c{len(parts)}"] = tuple(constants)
            parts.append(f"c{len(parts)}")
            constants.clear()
        if kind == "values" and values:
            parts.append(f"({', '.join(values)},)")
            values.clear()

    for name in names:
        i = index.get(alias.get(name, name))
        if i is None:
            close("values")
            value = planned[name]
            constants.append(value.data_ptr() if pointers and isinstance(value, torch.Tensor) else value)
        else:
            close("constants")
            tensor = isinstance(planned[varying[i]], torch.Tensor)
            values.append(f"p{i}" if pointers and tensor else f"v{i}")
    close("constants"), close("values")
    return " + ".join(parts) if parts else "()"


def _arguments_function(names: list[str], varying: list[str], alias: dict[str, str], planned: dict):
    """values -> every parameter's value in order (tensors as tensors), for Triton's normal path."""
    namespace: dict[str, Any] = {}
    expression = _sources(names, varying, alias, planned, namespace, pointers=False)
    params = ", ".join(f"v{i}" for i in range(len(varying)))
    exec(f"def arguments({params}):\n    return {expression}", namespace)
    return namespace["arguments"]


def _prepare_function(names: list[str], varying: list[str], alias: dict[str, str], planned: dict):
    """values -> (the 16-byte alignment bits of the varying tensors, or None if one changed dtype;
    every parameter's value in order, tensors as their addresses). Straight-line code, built once
    per launch (as Triton's binder is): a loop over the arguments costs twice as much per call."""
    namespace: dict[str, Any] = {}
    expression = _sources(names, varying, alias, planned, namespace, pointers=True)
    tensors = [i for i, n in enumerate(varying) if isinstance(planned[n], torch.Tensor)]
    body = [f"def prepare({', '.join(f'v{i}' for i in range(len(varying)))}):"]
    if tensors:
        for i in tensors:
            namespace[f"d{i}"] = planned[varying[i]].dtype
        body += [f"    if {' or '.join(f'v{i}.dtype is not d{i}' for i in tensors)}:", "        return None, None"]
        body += [f"    p{i} = v{i}.data_ptr()" for i in tensors]
        # All aligned (fresh allocations are): one test; otherwise which ones.
        every = (1 << len(tensors)) - 1
        body.append(f"    bits = {every} if (({' | '.join(f'p{i}' for i in tensors)}) & 15) == 0 else " +
                    " | ".join(f"(((p{i} & 15) == 0) << {k})" for k, i in enumerate(tensors)))
        bits = "bits"
    else:
        bits = "0"
    body.append(f"    return {bits}, {expression}")
    exec("\n".join(body), namespace)
    return namespace["prepare"]


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
