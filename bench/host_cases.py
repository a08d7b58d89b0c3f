"""The host-time cases: each a step of the library (or its PyTorch peer) and what one call costs.

Run in a process of its own (bench/host_stub.py installs the stand-in driver):

    python bench/host_cases.py            # every case: µs per call, launches, Python calls, aten ops, allocations
    python bench/host_cases.py --serve    # the worker bench/test_bench_host.py drives (JSON lines on stdin/stdout)

The fused cases run the Triton backend, launches stopped at the driver; the
eager reference runs for real on the CPU (nn.Linear + F.mse_loss + backward +
torch.optim.SGD on a 5×3→2 batch, the tutorial's step) in the same process,
so that ratios to it compare like with like on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

import host_stub

FAKE = host_stub.install()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from linreg_fused import FusedLinearRegressor, FusedSGD  # noqa: E402

torch.set_num_threads(1)  # the shapes are tiny; one thread is the right setting on a shared machine

SHAPES = {"tutorial": (5, 3, 2), "minibatch": (1024, 256, 16)}  # (rows, in_features, out_features)


def _data(shape: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    n, d, o = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, o, generator=g)


def _fused(shape: str, **sgd) -> tuple[FusedLinearRegressor, FusedSGD]:
    _, d, o = SHAPES[shape]
    torch.manual_seed(0)
    model = FusedLinearRegressor(d, o, backend="triton")
    return model, FusedSGD(model.parameters(), lr=1e-3, backend="triton", **sgd)


def eager_step(shape: str = "tutorial") -> Callable[[], Any]:
    _, d, o = SHAPES[shape]
    x, t = _data(shape)
    model = nn.Linear(d, o)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        loss = F.mse_loss(model(x), t)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    return step


def train_step(shape: str = "tutorial", **sgd) -> Callable[[], Any]:
    model, opt = _fused(shape, **sgd)
    x, t = _data(shape)
    return lambda: model.train_step(x, t, opt)


def train_step_one_launch(shape: str = "tutorial") -> Callable[[], Any]:
    """train_step with backend.STEP_LAUNCHES = "auto" during its calls: the one-launch kernel where the
    rule allows it (not yet the default: it has not run on a GPU). The switch costs two attribute sets."""
    from linreg_fused import backend

    step = train_step(shape)

    def one_launch():
        backend.STEP_LAUNCHES = "auto"
        try:
            return step()
        finally:
            backend.STEP_LAUNCHES = 2

    return one_launch


def loss_backward(shape: str = "tutorial") -> Callable[[], Any]:
    model, opt = _fused(shape)
    x, t = _data(shape)
    return lambda: model.loss(x, t, optimizer=opt).backward()


class _Empty(torch.autograd.Function):
    """autograd's floor: a custom Function that saves two parameters and makes a 0-d output,
    and whose backward checks them and returns nothing."""

    @staticmethod
    def forward(ctx, weight, bias):
        ctx.save_for_backward(weight, bias)
        return torch.empty((), dtype=weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        ctx.saved_tensors  # noqa: B018
        return None, None


def autograd_floor(shape: str = "tutorial") -> Callable[[], Any]:
    model, _ = _fused(shape)
    return lambda: _Empty.apply(model.weight, model.bias).backward()


def _with_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def fused_sgd_dot_step(shape: str = "tutorial") -> Callable[[], Any]:
    model, opt = _fused(shape)
    _with_grads(model)
    return opt.step


def torch_sgd_foreach_step(shape: str = "tutorial") -> Callable[[], Any]:
    _, d, o = SHAPES[shape]
    model = nn.Linear(d, o)
    _with_grads(model)
    return torch.optim.SGD(model.parameters(), lr=1e-3, foreach=True).step


def _grad_launch(fast: bool) -> Callable[[], Any]:
    """One launch of the gradient kernel (5x3->2 plan): Triton's JITFunction.run, or FastLaunch."""
    from linreg_fused.kernels import linear_mse_grad
    from linreg_fused.kernels.launch import FastLaunch

    x, t = _data("tutorial")
    w, b = torch.randn(2, 3), torch.randn(2)
    plan, _ = linear_mse_grad.plan_linear_mse_partials(x, w, b, t)
    if not fast:
        return plan.launch
    launch = FastLaunch(plan, ["x_ptr", "w_ptr", "b_ptr", "t_ptr"])
    launch(x, w, b, t)  # compiles; then .launch is the generated launch function the steps call
    return lambda: launch.launch(x, w, b, t)


# name -> (setup, is the group's baseline)
CASES: dict[str, tuple[Callable[[], Callable[[], Any]], bool]] = {
    "eager step (nn.Linear+F.mse_loss+backward+SGD, CPU 5x3->2)": (eager_step, True),
    "train_step (FusedSGD)": (train_step, False),
    "train_step (FusedSGD, momentum 0.9)": (lambda: train_step(momentum=0.9), False),
    "train_step (FusedSGD, one-launch kernel, opt-in)": (train_step_one_launch, False),
    "loss(optimizer=).backward()": (loss_backward, False),
    "autograd floor: empty Function.apply + backward()": (autograd_floor, False),
    "FusedSGD.step()": (fused_sgd_dot_step, False),
    "torch.optim.SGD(foreach=True).step() (CPU)": (torch_sgd_foreach_step, False),
    "train_step (FusedSGD, 1024x256->16 plan)": (lambda: train_step("minibatch"), False),
    "launch: JITFunction.run (kernel[grid](...))": (lambda: _grad_launch(False), False),
    "launch: FastLaunch (kernels/launch.py)": (lambda: _grad_launch(True), False),
}
EAGER = next(name for name, (_, baseline) in CASES.items() if baseline)


class Runner:
    """One case set up, warmed (kernels compiled and loaded), its per-call counts taken."""

    def __init__(self, name: str) -> None:
        setup, self.baseline = CASES[name]
        self.name, self.step = name, setup()
        for _ in range(3):  # compiles, loads, and reaches the repeat-call path
            self.step()
        before = FAKE.launches()
        self.step()
        self.launches = FAKE.launches() - before
        self.python_calls = host_stub.python_calls(self.step)
        self.aten_ops, self.allocations = host_stub.aten_ops_and_allocations(self.step)

    def run(self, calls: int) -> None:
        step = self.step
        for _ in range(calls):
            step()

    def us_per_call(self, calls: int = 2000, repeats: int = 7) -> float:
        return host_stub.us_per_call(self.step, calls, repeats)

    def counts(self) -> dict[str, Any]:
        return {"launches": self.launches, "python_calls": self.python_calls, "aten_ops": self.aten_ops,
                "allocations": self.allocations}


def measure_all(calls: int, repeats: int) -> list[dict[str, Any]]:
    """Every case, interleaved over the repeats so that a burst of load hits all of them alike."""
    runners = {name: Runner(name) for name in CASES}
    best = {name: float("inf") for name in CASES}
    for _ in range(repeats):
        for name, runner in runners.items():
            best[name] = min(best[name], runner.us_per_call(calls, 1))
    eager = best[EAGER]
    return [{"case": name, "us_per_call": best[name], "vs_eager": best[name] / eager, **runners[name].counts()}
            for name in CASES]


def serve() -> None:
    """JSON lines: {"setup": case} -> counts and µs per call (with the eager step's, timed beside it);
    {"run": case, "calls": n} -> {"done": n} after n calls."""
    runners: dict[str, Runner] = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "setup" in request:
                name = request["setup"]
                runners.setdefault(EAGER, Runner(EAGER))
                runner = runners.setdefault(name, Runner(name))
                us, eager = float("inf"), float("inf")
                for _ in range(request.get("repeats", 5)):  # the same-run ratio: interleaved, min of each
                    us = min(us, runner.us_per_call(request.get("calls", 1000), 1))
                    eager = min(eager, runners[EAGER].us_per_call(request.get("calls", 1000), 1))
                reply = {"us_per_call": us, "eager_us_per_call": eager, "baseline": runner.baseline,
                         **runner.counts()}
            else:
                runners[request["run"]].run(request["calls"])
                reply = {"done": request["calls"]}
        except Exception as e:  # reported to the test, which fails with it
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--serve", action="store_true")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args()
    if args.serve:
        serve()
        return
    rows = measure_all(args.calls, args.repeats)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{'case':58} {'us/call':>8} {'x eager':>8} {'launch':>6} {'py calls':>8} {'aten':>5} {'alloc':>5}")
    for r in rows:
        print(f"{r['case']:58} {r['us_per_call']:8.1f} {r['vs_eager']:8.3f} {r['launches']:6} "
              f"{r['python_calls']:8} {r['aten_ops']:5} {r['allocations']:5}")


if __name__ == "__main__":
    main()
