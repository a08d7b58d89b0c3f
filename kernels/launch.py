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
addresses), as long as what Triton specialised on is unchanged: the device,
and the dtype and 16-byte alignment of each varying tensor (every other
argument is fixed, so its specialisation is too). Anything else takes the
normal path again: a tensor of another alignment (its kernel is then kept
too), another dtype, launch hooks set by a profiler (Triton then builds
launch metadata for them), and Triton's interpreter (nothing is compiled
there).

The first compiled variant gets a launch function of its own
(``FastLaunch.launch``): straight-line code with every fixed argument a
literal, as Triton's own binder is built, since a loop over 60 arguments
costs more than the launch itself.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .plan import LaunchPlan

_LITERALS = (bool, int, str, type(None))  # constants written into generated code as their repr()


class FastLaunch:
    """``plan``'s kernel, relaunched with new values of the arguments named in ``varying``.

    ``fast(*values)`` (or ``fast.launch(*values)``, one call fewer) takes the
    values in the order of ``varying``; a name may appear once, but several
    parameters may share a value with ``alias`` (parameter -> varying name).
    Floats must stay floats, tensors keep their dtype (a new dtype goes
    through Triton's normal path), except the tensors named in ``trusted``:
    their caller guarantees the planned dtype (as every caller guarantees the
    planned shapes and strides, which are fixed arguments), and their dtype is
    not looked at again."""

    def __init__(self, plan: LaunchPlan, varying: Sequence[str], alias: dict[str, str] | None = None,
                 trusted: Sequence[str] = ()) -> None:
        self.kernel, self.grid = plan.kernel, plan.grid
        self.options = {"num_warps": plan.num_warps, "num_stages": plan.num_stages}
        self.names = list(plan.kernel.arg_names)
        self.varying, self.alias = list(varying), dict(alias or {})
        unknown = [n for n in self.varying + list(self.alias) + list(trusted) if n not in plan.args]
        if unknown:
            raise ValueError(f"{plan.kernel}: not runtime arguments of the plan: {unknown}")
        # Every parameter's planned value; of a varying one only its kind (a tensor's dtype): the plan must
        # not keep the tensors of the call it was made from alive (a batch, a gradient).
        self.values = {**plan.args, **plan.constexprs}
        for name in self.varying + list(self.alias):
            self.values[name] = _Varying(self.values[name])
        self.checked = [n for n in self.varying if _is_tensor(self.values[n]) and n not in trusted]
        self._prepare = _prepare_function(self.names, self.varying, self.alias, self.values, self.checked)
        self._arguments = _arguments_function(self.names, self.varying, self.alias, self.values)
        self.grid3 = (tuple(plan.grid) + (1, 1))[:3]
        self._compiled: dict[tuple, Any] = {}  # (device, alignment bits) -> a launch of the compiled kernel
        self._driver = None
        self._knobs = None
        self.launch = self.__call__  # until a kernel is compiled; then _direct_function's

    def __call__(self, *values: Any) -> None:
        bits, pointers = self._prepare(*values)
        driver = self._driver
        if driver is not None and bits is not None and not _hooked(self._knobs):
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
            device = self._driver.get_current_device()
            self._compiled[(device, bits)] = _launcher(compiled, self.grid3)
            if self.launch == self.__call__:  # the first variant compiled: its own launch function
                self.launch = _direct_function(self, compiled, device, bits)


class _Varying:
    """Stands in for a varying argument's planned value: whether it is a tensor, and its dtype."""

    __slots__ = ("dtype",)

    def __init__(self, value: Any) -> None:
        self.dtype = value.dtype if isinstance(value, torch.Tensor) else None


def _is_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (type(value) is _Varying and value.dtype is not None)


class Composed:
    """Launches run together, with FastLaunch's calling convention: ``launch(*values)``."""

    def __init__(self, launch) -> None:
        self.launch = launch


def _hooked(runtime) -> bool:
    """Whether a launch hook is set (a profiler's): Triton >= 3.9 keeps them in HookChains, older
    releases in plain attributes (None when unset)."""
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave))


def _literal(value: Any, namespace: dict, name: str) -> str:
    """Source text for a fixed value: its repr where that reads back as the same value, else a
    name bound in ``namespace``."""
    if type(value) in _LITERALS or (type(value) is float and value == value and abs(value) != float("inf")):
        return repr(value)
    namespace[name] = value
    return name


def _sources(names: list[str], varying: list[str], alias: dict[str, str], planned: dict,
             namespace: dict, pointers: bool) -> str:
    """A tuple display of every parameter's value in order: a varying value ``v<i>`` (``p<i>``,
    its address, for a tensor when ``pointers``), a fixed one as a literal (a fixed tensor as its
    address when ``pointers``: the C launcher takes an address as it is, without data_ptr())."""
    index = {name: i for i, name in enumerate(varying)}
    items = []
    for j, name in enumerate(names):
        i = index.get(alias.get(name, name))
        if i is None:
            value = planned[name]
            if pointers and isinstance(value, torch.Tensor):
                value = value.data_ptr()
            items.append(_literal(value, namespace, f"c{j}"))
        else:
            items.append(f"p{i}" if pointers and _is_tensor(planned[varying[i]]) else f"v{i}")
    return f"({', '.join(items)},)" if items else "()"


def _arguments_function(names: list[str], varying: list[str], alias: dict[str, str], planned: dict):
    """values -> every parameter's value in order (tensors as tensors), for Triton's normal path."""
    namespace: dict[str, Any] = {}
    expression = _sources(names, varying, alias, planned, namespace, pointers=False)
    params = ", ".join(f"v{i}" for i in range(len(varying)))
    exec(f"def arguments({params}):\n    return {expression}", namespace)
    return namespace["arguments"]


def _pointer_lines(varying: list[str], planned: dict, checked: list[str], namespace: dict,
                   mismatch: str) -> tuple[list[str], list[int]]:
    """Lines that return ``mismatch`` when a checked tensor changed dtype and take each varying
    tensor's address ``p<i>``; and the indices i of the varying tensors."""
    tensors = [i for i, n in enumerate(varying) if _is_tensor(planned[n])]
    lines = []
    dtypes = [i for i in tensors if varying[i] in checked]
    for i in dtypes:
        namespace[f"d{i}"] = planned[varying[i]].dtype
    if dtypes:
        lines += [f"    if {' or '.join(f'v{i}.dtype is not d{i}' for i in dtypes)}:", f"        return {mismatch}"]
    return lines + [f"    p{i} = v{i}.data_ptr()" for i in tensors], tensors


def _misaligned(tensors: list[int]) -> str:
    """Nonzero when any of the addresses p<i> is off 16-byte alignment."""
    return f"({' | '.join(f'p{i}' for i in tensors)}) & 15"


def _bits(tensors: list[int]) -> str:
    """The alignment bits: bit k set when the k-th tensor's address is a multiple of 16."""
    if not tensors:
        return "0"
    every = (1 << len(tensors)) - 1  # all aligned (fresh allocations are): one test; otherwise which ones
    return f"{every} if ({_misaligned(tensors)}) == 0 else " + \
        " | ".join(f"(((p{i} & 15) == 0) << {k})" for k, i in enumerate(tensors))


def _prepare_function(names: list[str], varying: list[str], alias: dict[str, str], planned: dict,
                      checked: list[str]):
    """values -> (the 16-byte alignment bits of the varying tensors, or None if a checked one
    changed dtype; every parameter's value in order, tensors as their addresses)."""
    namespace: dict[str, Any] = {}
    expression = _sources(names, varying, alias, planned, namespace, pointers=True)
    lines, tensors = _pointer_lines(varying, planned, checked, namespace, "None, None")
    body = [f"def prepare({', '.join(f'v{i}' for i in range(len(varying)))}):", *lines,
            f"    return {_bits(tensors)}, {expression}"]
    exec("\n".join(body), namespace)
    return namespace["prepare"]


def _direct_function(fast: FastLaunch, compiled, device: int, bits: int):
    """The launch of one compiled variant (the device and alignment bits it was compiled for) as one
    generated function; any other device, alignment, dtype, or a launch hook: ``fast(...)``."""
    varying = fast.varying
    namespace: dict[str, Any] = {"general": fast.__call__, "R": fast._knobs, "DEVICE": device,
                                 "current_device": _current_device(fast._driver),
                                 "current_stream": fast._driver.get_current_stream}
    params = ", ".join(f"v{i}" for i in range(len(varying)))
    again = f"general({params})"
    lines, tensors = _pointer_lines(varying, fast.values, fast.checked, namespace, again)
    body = [f"def launch({params}):", *lines]
    if tensors:
        every = (1 << len(tensors)) - 1
        test = _misaligned(tensors) if bits == every else f"({_bits(tensors)}) != {bits}"
        body += [f"    if {test}:", f"        return {again}"]
    runtime = fast._knobs
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    if hasattr(enter, "calls") and hasattr(leave, "calls"):  # Triton's HookChains: a hook is an entry in them
        namespace.update(ENTER=enter, LEAVE=leave)
        hooks = "R.launch_enter_hook is not ENTER or R.launch_exit_hook is not LEAVE or ENTER.calls or LEAVE.calls"
    else:
        namespace["hooked"] = _hooked
        hooks = "hooked(R)"
    body += [f"    if {hooks}:", f"        return {again}",
             "    device = current_device()",
             "    if device != DEVICE:", f"        return {again}"]
    # The arguments: a copy of the planned list with the varying values set (cheaper than building
    # a 60-item tuple; the C launcher reads any sequence).
    namespace["ARGUMENTS"] = _template(fast)
    index = {name: i for i, name in enumerate(varying)}
    body.append("    args = ARGUMENTS.copy()")
    for j, name in enumerate(fast.names):
        i = index.get(fast.alias.get(name, name))
        if i is not None:
            body.append(f"    args[{j}] = {'p' if i in tensors else 'v'}{i}")
    gx, gy, gz = fast.grid3
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    namespace.update(RUN=run, FUNCTION=function, METADATA=metadata)
    if _direct(run):
        namespace.update(C_LAUNCH=run.launch, COOPERATIVE=run.launch_cooperative_grid, PDL=run.launch_pdl,
                         ANNOTATIONS=run.arg_annotations, SIGNATURE=run.kernel_signature)
        body.append(f"    C_LAUNCH({gx}, {gy}, {gz}, current_stream(device), FUNCTION, COOPERATIVE, PDL, METADATA, "
                    "None, None, None, None, None, ANNOTATIONS, SIGNATURE, args)")
    else:
        body.append(f"    RUN({gx}, {gy}, {gz}, current_stream(device), FUNCTION, METADATA, None, None, None, *args)")
    exec("\n".join(body), namespace)
    return namespace["launch"]


def _template(fast: FastLaunch) -> list:
    """Every parameter's planned value in order, fixed tensors as their addresses."""
    return [v.data_ptr() if isinstance(v, torch.Tensor) else None if type(v) is _Varying else v
            for v in (fast.values[n] for n in fast.names)]


def _current_device(driver):
    """The driver's current-device function; torch.cuda.current_device's C call where that is it (the
    Python function first makes sure CUDA is initialised, which a compiled kernel shows it is)."""
    if driver.get_current_device is getattr(torch.cuda, "current_device", None) and \
            hasattr(torch._C, "_cuda_getDevice"):
        return torch._C._cuda_getDevice
    return driver.get_current_device


_NEEDED = ("launch", "arg_annotations", "kernel_signature", "launch_cooperative_grid", "launch_pdl",
           "global_scratch_size", "profile_scratch_size")


def _direct(run) -> bool:
    """Whether a launcher can be skipped for the driver's C launch function: Triton's CudaLauncher,
    for a kernel that needs no scratch memory (which the launcher would allocate)."""
    return (type(run).__name__ == "CudaLauncher" and all(hasattr(run, a) for a in _NEEDED)
            and run.global_scratch_size == 0 and run.profile_scratch_size == 0
            and not getattr(run, "gsan_enabled", False))


def _launcher(compiled, grid3: tuple[int, int, int]):
    """(stream, args) -> launch of a compiled kernel. Through its launcher object (which allocates
    the scratch memory the kernel asks for); straight to the driver's C launch function when the
    launcher is Triton's CudaLauncher and the kernel needs no scratch (half the host time)."""
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    gx, gy, gz = grid3
    if not _direct(run):
        return lambda stream, args: run(gx, gy, gz, stream, function, metadata, None, None, None, *args)
    c_launch, annotations, signature = run.launch, run.arg_annotations, run.kernel_signature
    cooperative, pdl = run.launch_cooperative_grid, run.launch_pdl
    return lambda stream, args: c_launch(gx, gy, gz, stream, function, cooperative, pdl, metadata, None, None, None,
                                         None, None, annotations, signature, args)
