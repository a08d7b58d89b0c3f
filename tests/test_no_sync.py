"""No host sync on the step paths: the library's own code never reads a tensor back to the host
(item(), float(), int(), bool(), tolist(), cpu(), numpy(), torch.cuda.synchronize) in a
train_step (first call and repeat calls), a loss(optimizer=).backward(), a FusedSGD.step(), or
a forward, with a float or a tensor learning rate.

On a GPU each of those reads is a sync; on the CPU they are counted where the library calls them
(Triton's interpreter reads tensors too, but that is the interpreter, not the step). With CUDA,
torch.cuda.set_sync_debug_mode("error") checks the same from the other side.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE
from oracle import random_problem

import linreg_fused
from linreg_fused import FusedLinearRegressor, FusedSGD
from linreg_fused.optim import group_hyper

LIBRARY = (str(Path(linreg_fused.__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "kernels"))
READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy")


@pytest.fixture
def reads(monkeypatch):
    """The host reads made by the library's own code: a list of 'file:line method'."""
    # Under TRITON_INTERPRET the backend probes the interpreter once per process (kernels/probe.py,
    # a CPU tensor): done before counting.
    linreg_fused.backend.select_ops("auto", DEVICE)
    seen = []

    def counted(name, real):
        def read(*args, **kwargs):
            caller = sys._getframe(1)
            path = str(Path(caller.f_code.co_filename).resolve())
            if path.startswith(LIBRARY):
                seen.append(f"{Path(path).name}:{caller.f_lineno} {name}")
            return real(*args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted("synchronize", torch.cuda.synchronize))
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("error")
        yield seen
        torch.cuda.set_sync_debug_mode("default")
    else:
        yield seen


def test_the_counter_sees_a_read(reads):
    """The check can fail: a tensor lr read on the host (what group_hyper does without lr_on) counts."""
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("default")
    group_hyper({"lr": torch.tensor(0.1), "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                 "nesterov": False})
    assert reads, "a float() of a tensor inside the library was not counted"


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_steps_read_nothing_back(reads, backend, tensor_lr):
    model = FusedLinearRegressor(4, 3, backend=backend).to(DEVICE)
    lr = torch.tensor(0.05, device=DEVICE) if tensor_lr else 0.05
    opt = FusedSGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=0.01, backend=backend)
    for _ in range(4):  # the first call, the one that plans, and repeat calls
        x, _, _, t = random_problem(9, 4, 3, device=DEVICE)
        model.train_step(x, t, opt)
    for _ in range(2):
        model.loss(x, t, optimizer=opt).backward()
    loss = model.loss(x, t)
    loss.backward()
    for _ in range(3):
        opt.step()
    with torch.no_grad():
        model(x)
    assert reads == [], f"host reads in the library: {reads}"
