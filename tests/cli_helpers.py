"""Shared by the command-line tests: running linreg-fused, writing data files, reading its
tables back, and the numbers it should print, computed independently in float64 NumPy."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np

from linreg_fused.cli import main

HAS_ARROW = importlib.util.find_spec("pyarrow") is not None
CROP_CSV = os.path.join(os.path.dirname(__file__), "..", "linreg_fused", "data", "crop_yields.csv")

# A user's shell: without the TRITON_INTERPRET=1 that conftest sets for in-process tests, so on a
# machine without CUDA "auto" runs the PyTorch reference, as it does for someone who just installed.
USER_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run(args, **kwargs) -> subprocess.CompletedProcess:
    """linreg-fused in a fresh interpreter (python -m linreg_fused), as a user runs it."""
    return subprocess.run([sys.executable, "-m", "linreg_fused", *args], capture_output=True, text=True,
                          env=USER_ENV, **kwargs)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *args) -> tuple[dict, str]:
    """A run with --json: the object printed (stdout must hold nothing else) and stderr."""
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    return json.loads(out), err


def linear_data(n, d, o, noise, rng):
    """x (n, d) with varied means and scales, y = x·wᵀ + b + noise, and the true w, b.

    w and b stay away from 0 (|w| in [0.5, 3], |b| in [20, 60]): a coefficient near zero beside
    features of mean ~50 has only ~4 correct digits in float32 data, and the solver rightly warns
    about it, which the tests that expect a quiet run would then see at random."""
    x = rng.standard_normal((n, d)) * rng.uniform(0.5, 20, d) + rng.uniform(-50, 50, d)
    sign = lambda shape: rng.choice([-1.0, 1.0], shape)  # noqa: E731
    w, b = sign((o, d)) * rng.uniform(0.5, 3, (o, d)), sign(o) * rng.uniform(20, 60, o)
    y = x @ w.T + b + noise * rng.standard_normal((n, o))
    return x, y, w, b


def write_csv(path, names, values, delimiter=","):
    """A CSV of ``values`` whose cells read back exactly (pyarrow writes faster when present)."""
    if HAS_ARROW and delimiter == ",":
        import pyarrow as pa
        import pyarrow.csv as pacsv

        with open(path, "w") as f:
            f.write(",".join(names) + "\n")
        with open(path, "ab") as f:
            pacsv.write_csv(pa.table({n: values[:, i] for i, n in enumerate(names)}), f,
                            pacsv.WriteOptions(include_header=False))
        return
    with open(path, "w") as f:
        f.write(delimiter.join(names) + "\n")
        np.savetxt(f, values, fmt="%.9g" if values.dtype == np.float32 else "%.17g", delimiter=delimiter)


def coefficient_rows(stdout: str) -> dict[str, list[float]]:
    """The coefficient table: row name (feature or "intercept") -> its numbers, every target's."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("feature "))
    rows = {}
    for line in lines[head + 1:]:
        if not line.strip():
            break
        parts = line.split()
        if not re.fullmatch(r"[-+.\deE]+|n/a", parts[-1]):
            continue  # the second header line (coef, std err, t)
        rows[parts[0]] = [float(p) if p != "n/a" else float("nan") for p in parts[1:]]
    return rows


def metrics_rows(text: str) -> dict[str, list[float]]:
    """The metrics table: target -> [MSE, RMSE, R²] for each part (train, then val)."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("target "))
    rows = {}
    for line in lines[head + 1:]:
        parts = line.split()
        if len(parts) < 4 or not re.fullmatch(r"[-+.\deE]+|nan|n/a", parts[1]):
            break
        rows[parts[0]] = [float(p) if p != "n/a" else float("nan") for p in parts[1:]]
    return rows


def expected_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, np.ndarray]:
    """MSE, RMSE and R² per target in float64, written out here rather than taken from the CLI."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    sse = ((pred - true) ** 2).sum(0)
    mse = sse / len(true)
    return {"mse": mse, "rmse": np.sqrt(mse), "r2": 1 - sse / ((true - true.mean(0)) ** 2).sum(0)}


def least_squares(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coef (O, D), intercept (O,)) of ordinary least squares with an intercept, numpy.linalg.lstsq."""
    z = np.column_stack([x, np.ones(len(x))])
    sol = np.linalg.lstsq(z, y.reshape(len(y), -1), rcond=None)[0]
    return sol[:-1].T, sol[-1]


def png_size(path) -> tuple[int, int]:
    raw = open(path, "rb").read(24)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")
