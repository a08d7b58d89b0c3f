"""Training plots with matplotlib (the ``plot`` extra; or ``pip install matplotlib``).

    history = model.fit(inputs, targets, epochs=100, batch_size=5, lr=1e-5)
    training_plot("loss.png", history, predicted=model(inputs), actual=targets,
                  target_names=["apples", "oranges"])

Draws without pyplot (a Figure on the Agg canvas), so it works on machines
without a display and leaves pyplot's global state alone.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Sequence

import numpy as np
import torch

PLOT_HINT = "pip install matplotlib (the plot extra)"
MAX_POINTS = 2000  # per target in the predicted-vs-actual panel


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says how to install it."""


def require_matplotlib() -> None:
    """Raise MissingExtraError (with the install command) if matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError(f"plotting needs matplotlib: {PLOT_HINT}")


def training_plot(
    path: str | os.PathLike,
    history: Sequence[float],
    *,
    val_history: Sequence[float] | None = None,
    predicted: torch.Tensor | np.ndarray | None = None,
    actual: torch.Tensor | np.ndarray | None = None,
    target_names: Sequence[str] | None = None,
    rows_label: str | None = None,
    size: tuple[float, float] = (10.0, 4.0),
    dpi: int = 100,
) -> None:
    """Write a PNG of size[0]·dpi × size[1]·dpi pixels to ``path``.

    Left panel (when ``history`` is not empty): the loss per epoch
    (``history``: fit's per-epoch mean batch loss; ``val_history``: the
    validation MSE at each epoch's end), on a log scale when every value is
    positive. Right panel (when ``predicted`` and
    ``actual``, both (N, O) or (N,), are given): predicted against actual
    values, one colour per target, with the line y = x; at most 2000 evenly
    spaced rows per target are drawn; ``rows_label`` says which rows they are
    (e.g. "validation rows") in the panel's title.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scatter = predicted is not None and actual is not None
    curves = len(history) > 0  # an exact solve has no epochs: the scatter alone
    if not (scatter or curves):
        raise ValueError("nothing to plot: give a loss history, or predicted and actual values")
    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, curves + scatter, squeeze=False)[0])

    if curves:
        ax = axes.pop(0)
        epochs = np.arange(1, len(history) + 1)
        ax.plot(epochs, history, label="train (epoch mean of batch losses)")
        if val_history is not None:
            ax.plot(np.arange(1, len(val_history) + 1), val_history, label="validation (MSE at epoch end)")
        values = [v for v in (*history, *(val_history or ())) if math.isfinite(v)]
        if values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("MSE loss")
        ax.set_title("Loss")
        ax.legend()

    if scatter:
        pred, true = (_as_2d_numpy(a) for a in (predicted, actual))
        if pred.shape != true.shape:
            raise ValueError(f"predicted {pred.shape} and actual {true.shape} differ in shape")
        names = list(target_names) if target_names is not None else [f"target {i}" for i in range(pred.shape[1])]
        rows = np.unique(np.linspace(0, len(pred) - 1, min(len(pred), MAX_POINTS)).astype(np.int64))
        ax = axes.pop(0)
        for i, name in enumerate(names):
            ax.scatter(true[rows, i], pred[rows, i], s=8, alpha=0.6, label=name)
        lo, hi = float(np.nanmin(true[rows])), float(np.nanmax(true[rows]))
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="y = x")
        ax.set_xlabel("actual")
        ax.set_ylabel("predicted")
        shown = f"{len(rows)} of {len(pred)} " if len(rows) < len(pred) else ""
        label = f" ({shown}{rows_label or 'rows'})" if shown or rows_label else ""
        ax.set_title(f"Predicted vs actual{label}")
        ax.legend()
    fig.savefig(os.fspath(path), dpi=dpi, format="png")


def _as_2d_numpy(a: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, 1) if a.ndim == 1 else a.reshape(-1, a.shape[-1])
