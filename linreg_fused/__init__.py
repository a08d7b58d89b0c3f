"""linreg-fused: fused Triton kernels that train multi-output linear
regression (Y = X·Wᵀ + b, MSE loss, SGD) as a drop-in for nn.Linear,
F.mse_loss and torch.optim.SGD.

    model = FusedLinearRegressor(3, 2)          # nn.Linear(3, 2)'s parameters and init
    loss = model.loss(inputs, targets)          # fused linear + MSE
    opt = FusedSGD(model.parameters(), lr=1e-5)
    history = model.fit(inputs, targets, epochs=100, batch_size=5, optimizer=opt)
    loss = model.solve(inputs, targets)         # the exact least-squares solution, from one pass
"""

from . import reference
from .backend import select_ops
from .functional import fused_sgd_step, linear, linear_mse
from .grouped_module import GroupedLinearRegressor
from .module import FusedLinearRegressor
from .optim import FusedSGD
from .stats import LinearStats
from .train import TrainingDivergedError, fit

__version__ = "0.1.0"

__all__ = [
    "FusedLinearRegressor",
    "FusedSGD",
    "GroupedLinearRegressor",
    "LinearStats",
    "TrainingDivergedError",
    "fit",
    "fused_sgd_step",
    "linear",
    "linear_mse",
    "reference",
    "select_ops",
]
