"""The main job: train on the tutorial's crop-yield data through the fused path.

    linreg-fused                       # 100 epochs, batch 5, lr 1e-5, as the tutorial
    linreg-fused --device cpu --backend torch --seed 0
"""

from __future__ import annotations

import argparse

import torch

from .backend import BACKENDS, describe, select_ops
from .data import FEATURES, TARGETS, crop_yields
from .module import FusedLinearRegressor
from .optim import FusedSGD
from .train import TrainingDivergedError

NEW_REGION = (75.0, 63.0, 44.0)  # temp, rainfall, humidity


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="linreg-fused", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="seed for the initial weights and the shuffling")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.seed is not None:
        torch.manual_seed(args.seed)
    inputs, targets = crop_yields(device=device)
    model = FusedLinearRegressor(len(FEATURES), len(TARGETS), device=device, backend=args.backend)
    opt = FusedSGD(model.parameters(), lr=args.lr, momentum=args.momentum, backend=args.backend)
    print(f"linreg-fused: {describe(select_ops(args.backend, device), device)}")
    print(f"training {model} on {inputs.shape[0]} crop-yield rows: {args.epochs} epochs, "
          f"batch {args.batch_size}, lr {args.lr:g}")
    try:
        model.fit(inputs, targets, epochs=args.epochs, batch_size=args.batch_size, optimizer=opt,
                  seed=args.seed, log_every=args.log_every, progress=False)
    except TrainingDivergedError as err:
        print(f"error: {err}")
        return 1
    with torch.no_grad():
        preds = model(inputs)
        new = model(torch.tensor([NEW_REGION], device=device))
    print("\npredictions vs targets (apples, oranges):")
    for p, t in zip(preds.tolist(), targets.tolist()):
        print(f"  {p[0]:8.2f} {p[1]:8.2f}    {t[0]:6.0f} {t[1]:6.0f}")
    print(f"\nnew region (temp {NEW_REGION[0]:g}, rainfall {NEW_REGION[1]:g}, humidity {NEW_REGION[2]:g}): "
          f"apples {new[0, 0]:.2f}, oranges {new[0, 1]:.2f}")
    return 0
