"""``linreg-fused`` with no command: the tutorial's loop on its crop-yield data, seeded."""

from __future__ import annotations

import argparse

import torch

from ..backend import describe, select_ops
from ..data import FEATURES, TARGETS, crop_yields
from ..module import FusedLinearRegressor
from ..optim import FusedSGD
from .common import device_for

NEW_REGION = (75.0, 63.0, 44.0)  # temp, rainfall, humidity


def tutorial(args: argparse.Namespace) -> int:
    device = device_for(args.device, args.backend)
    torch.manual_seed(args.seed)
    inputs, targets = crop_yields(device=device)
    # Initialised on the CPU, then moved: a seed gives the same model on every device
    # (CUDA's generator draws other numbers than the CPU's).
    model = FusedLinearRegressor(len(FEATURES), len(TARGETS), backend=args.backend).to(device)
    opt = FusedSGD(model.parameters(), lr=args.lr, momentum=args.momentum, backend=args.backend)
    say = (lambda *a: None) if args.quiet else print
    say(f"linreg-fused: {describe(select_ops(args.backend, device), device)}")
    say(f"training {model} on {inputs.shape[0]} crop-yield rows: {args.epochs} epochs, "
        f"batch {args.batch_size}, lr {args.lr:g}, seed {args.seed}")
    model.fit(inputs, targets, epochs=args.epochs, batch_size=args.batch_size, optimizer=opt, seed=args.seed,
              log_every=None if args.quiet else args.log_every or None, progress=False)
    with torch.no_grad():
        preds = model(inputs)
        new = model(torch.tensor([NEW_REGION], device=device))
    print(f"\npredictions vs targets ({', '.join(TARGETS)}):")
    print(f"  {'predicted':^17}    {'actual':^15}".rstrip())
    print(f"  {TARGETS[0]:>8} {TARGETS[1]:>8}    {TARGETS[0]:>7} {TARGETS[1]:>7}")
    for p, t in zip(preds.tolist(), targets.tolist()):
        print(f"  {p[0]:8.2f} {p[1]:8.2f}    {t[0]:7.0f} {t[1]:7.0f}")
    print(f"\nnew region (temp {NEW_REGION[0]:g}, rainfall {NEW_REGION[1]:g}, humidity {NEW_REGION[2]:g}): "
          f"apples {new[0, 0]:.2f}, oranges {new[0, 1]:.2f}")
    return 0
