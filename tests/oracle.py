"""float64 references built from the PyTorch code a user writes anyway:
nn.Linear + F.mse_loss + torch.optim.SGD."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
