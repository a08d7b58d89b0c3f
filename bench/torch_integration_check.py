"""The PyTorch-integration part of the GPU check: the registered ops under
torch.library.opcheck on the device, the fused train_step compiled
(torch.compile, fullgraph) and captured in a CUDA graph, each against the
eager step (the same numbers) and timed against it, and a one-GPU NCCL
process group through the data-parallel step.

``torch_integration_checks(device, smoke)`` returns parity.Check items, which the
GPU check's section bench/gpu_torch.py runs (check_ctx.run_checks); each fn
returns {"errors": {quantity: (error, tolerance)}, ...} with timings in "ms".
Run alone (prints one JSON line per check):

    python bench/torch_integration_check.py             # on a GPU
    python bench/torch_integration_check.py --cpu-smoke # the CPU dry run: Triton's interpreter, aot_eager,
                                                        # gloo; no CUDA graph; no timing claims
"""

from __future__ import annotations

import os
import sys
import tempfile
from datetime import timedelta
from functools import partial
from typing import Any

import torch

from parity import Check
from timing import bench_ms

# The problem of the compiled and graphed steps: a mini-batch step of a regression
# with many rows and a handful of outputs (smoke: the interpreter's size).
GPU_SHAPE, SMOKE_SHAPE = (8192, 64, 4), (24, 5, 3)
STEPS = 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _problem(device: torch.device, smoke: bool, seed: int):
    """Two models with the same parameters and their FusedSGDs (momentum), and STEPS + 1 batches."""
    from linreg_fused import FusedLinearRegressor, FusedSGD

    n, d, o = SMOKE_SHAPE if smoke else GPU_SHAPE
    g = torch.Generator().manual_seed(seed)
    models = [FusedLinearRegressor(d, o, backend="triton").to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [FusedSGD(m.parameters(), lr=1e-3, momentum=0.9, backend="triton") for m in models]
    batches = [(torch.randn(n, d, generator=g).to(device), torch.randn(n, o, generator=g).to(device))
               for _ in range(STEPS + 1)]
    return models, opts, batches


def _same_state(models, opts) -> dict[str, tuple[float, float]]:
    """Bitwise equality of parameters and momentum buffers, as (0 or 1, 0) error entries."""
    errors = {}
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        errors[f"{name} bitwise"] = (float(not torch.equal(p, q)), 0.0)
        errors[f"{name} buffer bitwise"] = (
            float(not torch.equal(opts[0].state[p]["momentum_buffer"], opts[1].state[q]["momentum_buffer"])), 0.0)
    return errors


def check_opcheck(device: torch.device) -> dict[str, Any]:
    """torch.library.opcheck of every linreg_fused op on the device (the Triton backend)."""
    from linreg_fused import ops
    from linreg_fused.kernels.specs import SGDHyper

    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, w, b, t = rand(37, 5), rand(3, 5), rand(3), rand(37, 3)
    hyper = ops.pack_sgd(SGDHyper(lr=0.1, momentum=0.9), True)
    cases = {
        "linear": (ops.linear, (x, w, b), {}),
        "linear_mse": (ops.linear_mse, (x, w, b, t), {"keep_residual": True}),
        "linear_mse_partials": (ops.linear_mse_partials, (x, w, None, t, torch.arange(0, 37, 3, device=device)), {}),
        "reduce_update_": (ops.reduce_update_, (rand(4, 19), w.clone(), torch.zeros_like(w), b.clone(),
                                                torch.zeros_like(b), None),
                           {"col_starts": [0, 15], "sgd": hyper, "sgd2": hyper, "scale": 0.5, "loss_column": 18,
                            "loss_dtype": torch.float32}),
        "fit_small_": (ops.fit_small_, (x, t, w.clone(), b.clone(), torch.zeros_like(w), torch.zeros_like(b),
                                        torch.stack([torch.randperm(37, generator=g) for _ in range(2)]).to(device),
                                        torch.empty(2, 2, device=device)),
                       {"batch_size": 8, "mean": True, "weight_sgd": hyper, "bias_sgd": hyper}),
    }
    errors, failures = {}, {}
    for name, (op, args, kwargs) in cases.items():
        result = torch.library.opcheck(op, args, {**kwargs, "backend": "triton"})
        failed = {test: status for test, status in result.items() if status != "SUCCESS"}
        errors[name] = (float(bool(failed)), 0.0)
        if failed:
            failures[name] = failed
    return {"errors": errors, "failures": failures}


def check_compiled_step(device: torch.device, smoke: bool) -> dict[str, Any]:
    """model.train_step(x, t, FusedSGD) under torch.compile(fullgraph=True) (inductor on a GPU,
    aot_eager on the CPU) against the eager step: the same numbers, one recompile at most
    (the first step creates the momentum buffers), and the time per step of each."""
    import torch._dynamo.testing

    models, opts, batches = _problem(device, smoke, seed=11)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager" if smoke else "inductor")
    step = torch.compile(models[0].train_step, backend=counter, fullgraph=True)
    errors = {}
    for i, (x, t) in enumerate(batches):
        loss, expected = step(x, t, opts[0]), models[1].train_step(x, t, opts[1])
        errors[f"loss step {i}"] = (_rel(loss, expected), 1e-6)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        errors[name] = (_rel(p, q), 1e-6)
    errors["graphs compiled"] = (float(counter.frame_count), 2.0)
    x, t = batches[0]
    ms = {"eager": bench_ms(lambda: models[1].train_step(x, t, opts[1]), device),
          "compiled": bench_ms(lambda: step(x, t, opts[0]), device)}
    return {"errors": errors, "ms": ms, "shape": list(x.shape) + [t.shape[1]], "backend": counter.backend,
            "note": f"eager {ms['eager']:.4f} ms, compiled {ms['compiled']:.4f} ms per step"}


def check_graphed_step(device: torch.device) -> dict[str, Any]:
    """model.train_step captured in torch.cuda.CUDAGraph: replays give the eager steps bitwise; time per
    replay against the eager step."""
    models, opts, batches = _problem(device, False, seed=12)
    for m, opt in zip(models, opts):  # the first step compiles the kernels and creates the buffers
        m.train_step(*batches[0], opt)
    static_x, static_t = (v.clone() for v in batches[0])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = models[0].train_step(static_x, static_t, opts[0])
    errors = {}
    for i, (x, t) in enumerate(batches[1:], start=1):
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        expected = models[1].train_step(x, t, opts[1])
        errors[f"loss step {i} bitwise"] = (float(not torch.equal(static_loss, expected)), 0.0)
    errors.update(_same_state(models, opts))
    x, t = batches[0]
    ms = {"eager": bench_ms(lambda: models[1].train_step(x, t, opts[1]), device),
          "graph replay": bench_ms(graph.replay, device)}
    return {"errors": errors, "ms": ms,
            "note": f"eager {ms['eager']:.4f} ms, graph replay {ms['graph replay']:.4f} ms per step"}


def check_process_group_step(device: torch.device, smoke: bool) -> dict[str, Any]:
    """A one-rank process group (NCCL on a GPU, gloo on the CPU) through the data-parallel step:
    the batch's sums all-reduced (one all_reduce), then the update; against the local step. A
    one-rank group is normally skipped (nothing to reduce), so this calls the step's parts."""
    import torch.distributed as dist

    from linreg_fused import distributed
    from linreg_fused.ops import RegisteredOps

    backend = "gloo" if device.type == "cpu" else "nccl"
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised in this process")
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=60),
                            **({"device_id": torch.device("cuda", torch.cuda.current_device())}
                               if device.type == "cuda" else {}))
    try:
        group = dist.group.WORLD
        models, opts, batches = _problem(device, smoke, seed=13)
        ops = RegisteredOps("triton", device)

        def reduced_step(x, t):
            m, opt = models[0], opts[0]
            partials = ops.grad_partials(x, m.weight, m.bias, t, row_index=None, store_residual=False,
                                         input_precision="ieee")
            batch = distributed.all_reduce_partials(partials, group)
            scale, factor = batch.grad_scales("mean")
            opt.fused_update(m.weight, m.bias).apply_(ops, batch.partials, factor, scale)
            return batch.loss("mean", torch.float32)

        errors = {}
        for i, (x, t) in enumerate(batches):
            loss, expected = reduced_step(x, t), models[1].train_step(x, t, opts[1])
            errors[f"loss step {i}"] = (_rel(loss, expected), 1e-5)  # the sums are added in another order
        for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
            errors[name] = (_rel(p, q), 1e-5)
        x, t = batches[0]
        ms = {"local step": bench_ms(lambda: models[1].train_step(x, t, opts[1]), device),
              "all-reduced step": bench_ms(lambda: reduced_step(x, t), device)}
        return {"errors": errors, "ms": ms, "process_group": backend,
                "note": f"local {ms['local step']:.4f} ms, all-reduced {ms['all-reduced step']:.4f} ms per step"}
    finally:
        dist.destroy_process_group()


def torch_integration_checks(device: torch.device, smoke: bool) -> list[Check]:
    """The checks, in order (each needs the budget's need_s to start: cold compiles included)."""
    checks = [Check("opcheck of the linreg_fused ops", partial(check_opcheck, device), 20.0),
              Check("train_step under torch.compile vs eager", partial(check_compiled_step, device, smoke), 30.0)]
    if device.type == "cuda":
        checks.append(Check("train_step in a CUDA graph vs eager", partial(check_graphed_step, device), 10.0))
    checks.append(Check(f"{'gloo' if device.type == 'cpu' else 'NCCL'} one-rank all-reduced step vs local",
                        partial(check_process_group_step, device, smoke), 15.0))
    return checks


def main() -> int:
    import json

    smoke = "--cpu-smoke" in sys.argv[1:]
    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before linreg_fused's kernels are imported
    elif not torch.cuda.is_available():
        print("no CUDA device; use --cpu-smoke for the CPU dry run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if smoke else "cuda")
    failed = False
    for check in torch_integration_checks(device, smoke):
        out = check.fn()
        bad = [k for k, (e, tol) in out["errors"].items() if not e <= tol]
        failed |= bool(bad)
        print(json.dumps({"name": check.name, "status": "fail" if bad else "pass", "failed": bad,
                          **{k: v for k, v in out.items() if k != "errors"}}, default=str), flush=True)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
