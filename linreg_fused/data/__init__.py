"""The tutorial's crop-yield data: 15 regions, (temp, rainfall, humidity) ->
(apples, oranges) yields, shipped inside the package."""

from __future__ import annotations

import csv
from importlib import resources

import torch

FEATURES = ("temp", "rainfall", "humidity")
TARGETS = ("apples", "oranges")


def crop_yields(device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (15, 3), targets (15, 2)) as tensors."""
    with resources.files(__package__).joinpath("crop_yields.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    inputs = torch.tensor([[float(r[k]) for k in FEATURES] for r in rows], dtype=dtype, device=device)
    targets = torch.tensor([[float(r[k]) for k in TARGETS] for r in rows], dtype=dtype, device=device)
    return inputs, targets
