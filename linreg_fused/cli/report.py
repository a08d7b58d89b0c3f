"""What the command line prints about a model: the coefficient table, the metrics table,
and the same as JSON. Plain numbers in, text out (no torch), so each is easy to check."""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

MAX_FEATURE_ROWS = 40  # longer tables show the first ones; --json has them all


def coefficient_table(
    features: Sequence[str],
    targets: Sequence[str],
    coef: Sequence[Sequence[float]],
    intercept: Sequence[float] | None,
    std_err: Sequence[Sequence[float]] | None = None,
    t_values: Sequence[Sequence[float]] | None = None,
    intercept_std_err: Sequence[float] | None = None,
    intercept_t: Sequence[float] | None = None,
) -> str:
    """One row per feature (then the intercept), one column group per target: the
    coefficient, and its standard error and t statistic when they are given.

    coef, std_err, t_values: (targets, features); intercept and its std_err, t: (targets,).
    A column is shown only when its numbers are given (never a placeholder); a number that is
    not finite (e.g. the standard error of a coefficient the data do not determine) shows as n/a.
    """
    extra = [("std err", std_err, intercept_std_err), ("t", t_values, intercept_t)]
    extra = [(name, table, icept) for name, table, icept in extra if table is not None]
    group = 1 + len(extra)
    width = max(10, *(len(n) for n in targets)) if group == 1 else 10
    label = max(9, *(len(f) for f in features))

    def cells(values: list[float | None]) -> str:
        return "".join(f"  {_number(v):>{width}}" for v in values)

    heads = [f"{'feature':<{label}}", "".join(f"  {name:>{group * width + 2 * (group - 1)}}" for name in targets)]
    lines = ["".join(heads)]
    if group > 1:
        lines.append(f"{'':<{label}}" + "".join(f"  {'coef':>{width}}" + "".join(f"  {n:>{width}}" for n, _, _ in extra)
                                                for _ in targets))
    shown = list(range(len(features)))
    if len(shown) > MAX_FEATURE_ROWS:
        shown = shown[:MAX_FEATURE_ROWS]
    for j in shown:
        row: list[float | None] = []
        for o in range(len(targets)):
            row += [coef[o][j], *(table[o][j] for _, table, _ in extra)]
        lines.append(f"{features[j]:<{label}}{cells(row)}")
    if len(features) > len(shown):
        lines.append(f"… {len(features) - len(shown)} more features (--json lists them all)")
    if intercept is not None:
        row = []
        for o in range(len(targets)):
            row += [intercept[o], *((icept[o] if icept is not None else None) for _, _, icept in extra)]
        lines.append(f"{'intercept':<{label}}{cells(row)}")
    return "\n".join(lines)


def metrics_table(targets: Sequence[str], parts: Sequence[tuple[str, dict[str, list[float]]]]) -> str:
    """One row per target: MSE, RMSE and R² of each part ("train", "val", or "" for the only
    one), each a dict of per-target lists as common.metrics makes them."""
    width = max(8, *(len(n) for n in targets))
    names = (("mse", "MSE"), ("rmse", "RMSE"), ("r2", "R²"))
    head = f"{'target':<{width}}" + "".join(f"  {f'{part} {label}'.strip():>{12 if key != 'r2' else 10}}"
                                            for part, _ in parts for key, label in names)
    lines = [head]
    for i, name in enumerate(targets):
        row = ""
        for _, values in parts:
            row += f"  {_number(values['mse'][i]):>12}  {_number(values['rmse'][i]):>12}"
            row += f"  {_r2(values['r2'][i]):>10}"
        lines.append(f"{name:<{width}}{row}")
    return "\n".join(lines)


def to_json(payload: dict[str, Any]) -> str:
    """Strict JSON (NaN and inf become null, which every parser reads)."""
    return json.dumps(_finite(payload), allow_nan=False)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if math.isfinite(value) else "n/a"


def _r2(value: float) -> str:
    return f"{value:.6f}" if math.isfinite(value) else "n/a"
