"""float64 references built from the PyTorch code a user writes anyway:
nn.Linear + F.mse_loss + torch.optim.SGD, over batches a real DataLoader
draws. Nothing here calls linreg_fused."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

# ‖out − ref‖ / ‖ref‖ bounds against a float64 reference, per input dtype.
TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
TF32_TOLERANCE = 5e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


def linear_mse_grads(x, weight, bias, target, reduction="mean", grad_scale=1.0):
    """float64 loss and grads of F.mse_loss(nn.Linear(x), target) * grad_scale."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    w64 = weight.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_() if bias is not None else None
    t64 = target.detach().double().requires_grad_(target.requires_grad)
    loss = F.mse_loss(F.linear(x64, w64, b64), t64, reduction=reduction)
    (loss * grad_scale).backward()
    return {
        "loss": loss.detach(),
        "weight": w64.grad,
        "bias": b64.grad if b64 is not None else None,
        "x": x64.grad,
        "target": t64.grad,
    }


def random_problem(n, d, o, *, dtype=torch.float32, device="cpu", bias=True, scale=1.0):
    """Fresh random inputs (never zeros): x (n, d), weight (o, d), bias (o,), target (n, o)."""
    x = torch.randn(n, d, dtype=dtype, device=device) * scale
    weight = torch.randn(o, d, dtype=dtype, device=device) / d**0.5
    b = torch.randn(o, dtype=dtype, device=device) if bias else None
    target = torch.randn(n, o, dtype=dtype, device=device)
    return x, weight, b, target


def loader_orders(n_rows, epochs, seed=None, shuffle=True):
    """Each epoch's row order as a real DataLoader draws it, from a generator
    seeded with ``seed`` (the global RNG when None). (epochs, n_rows), CPU."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    loader = DataLoader(TensorDataset(torch.arange(n_rows)), batch_size=n_rows, shuffle=shuffle, generator=generator)
    orders = torch.stack([torch.cat([rows for (rows,) in loader]) for _ in range(epochs)])
    if shuffle and n_rows >= 5:  # a fresh order every epoch (two equal ones: odds below 1/120)
        assert all(not torch.equal(a, b) for a, b in zip(orders, orders[1:])), "successive epochs share a row order"
    return orders


def eager_fit(linear, x, y, orders, batch_size, options, reduction="mean", dtype=torch.float64, last_losses=None):
    """The tutorial's fit, in float64 (nn.Linear + F.mse_loss + optim.SGD), over
    the given per-epoch row orders. Returns the model, the optimizer and each
    epoch's mean batch loss; appends each epoch's last batch loss (the
    tutorial's printed loss.item()) to ``last_losses`` if given."""
    ref = copy.deepcopy(linear).to(dtype)
    opt = torch.optim.SGD(ref.parameters(), **options)
    x, y = x.to(dtype), y.to(dtype)
    history = []
    for order in orders:
        order = order.to(x.device)
        losses = []
        for s in range(0, x.shape[0], batch_size):
            rows = order[s : s + batch_size]
            loss = F.mse_loss(ref(x[rows]), y[rows], reduction=reduction)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        history.append(sum(losses) / len(losses))
        if last_losses is not None:
            last_losses.append(losses[-1])
    return ref, opt, history


def assert_state_close(model, opt, ref, ref_opt, tol, what=""):
    """Weight, bias and both momentum buffers (present in both, or in neither)."""
    for name in ("weight", "bias"):
        p, r = getattr(model, name), getattr(ref, name)
        assert_close(p, r, tol, f"{what}{name}")
        buf, ref_buf = opt.state[p].get("momentum_buffer"), ref_opt.state[r].get("momentum_buffer")
        assert (buf is None) == (ref_buf is None), f"{what}{name}: a momentum buffer in one optimizer only"
        if ref_buf is not None:
            assert_close(buf, ref_buf, tol, f"{what}{name} momentum buffer")
