"""linreg-fused: fused Triton kernels that train multi-output linear
regression (Y = X·Wᵀ + b, MSE loss, SGD) as a drop-in for nn.Linear,
F.mse_loss and torch.optim.SGD.

    model = FusedLinearRegressor(3, 2)          # nn.Linear(3, 2)'s parameters and init
    loss = model.loss(inputs, targets)          # fused linear + MSE
    opt = FusedSGD(model.parameters(), lr=1e-5)
    history = model.fit(inputs, targets, epochs=100, batch_size=5, optimizer=opt)
    loss = model.solve(inputs, targets)         # the exact least-squares solution, from one pass

The names below are imported on first use (PEP 562), so that ``import
linreg_fused`` and the command line's ``--help`` and ``--version`` do not
import torch. The library's torch operators, which a saved ``torch.export``
program refers to, are registered when ``linreg_fused.ops`` is first
imported: by ``import linreg_fused.ops``, or by using the model, the
optimizer, ``fit``, ``LinearStats`` or the functional API.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the submodule that defines it
_EXPORTS = {
    "FusedLinearRegressor": "module",
    "FusedSGD": "optim",
    "GroupedLinearRegressor": "grouped_module",
    "LinearStats": "stats",
    "TrainingDivergedError": "train",
    "fit": "train",
    "fused_sgd_step": "functional",
    "linear": "functional",
    "linear_mse": "functional",
    "select_ops": "backend",
}

__all__ = sorted([*_EXPORTS, "reference"])

if TYPE_CHECKING:
    from . import reference
    from .backend import select_ops
    from .functional import fused_sgd_step, linear, linear_mse
    from .grouped_module import GroupedLinearRegressor
    from .module import FusedLinearRegressor
    from .optim import FusedSGD
    from .stats import LinearStats
    from .train import TrainingDivergedError, fit


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f".{name}", __name__) is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule: linreg_fused.serialization, ...
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
