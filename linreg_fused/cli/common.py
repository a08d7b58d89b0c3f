"""What train and predict share: paths checked before any work, the device, the data's
columns, and the metrics."""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from ..backend import select_ops
from ..io import DataError, column_names, other_delimiter
from .options import UsageError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
EXAMPLE_NAMES = {"--save": "model.safetensors", "--plot": "plot.png", "-o": "predictions.csv"}


# ---------------------------------------------------------------- paths, before any work

def check_input(path: str, what: str) -> None:
    """An input file that exists and is a file (a folder gets its own message, not "no such file")."""
    if os.path.isdir(path):
        raise UsageError(f"{path} is a folder; {what} must be a file")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")


def check_outputs(outputs: dict[str, str | None], inputs: tuple[str, ...] = ()) -> None:
    """Each output path (option -> path) can be written: not a folder, its folder exists and
    takes a new file, not one of the inputs, no two the same. Checked by creating (and
    removing) an empty file beside it, which is what the write will do."""
    given = {option: path for option, path in outputs.items() if path}
    seen: dict[str, str] = {}
    for option, path in given.items():
        full = os.path.realpath(path)  # the file a symlink names is the one written: its folder must exist
        if os.path.isdir(full):
            example = os.path.join(path, EXAMPLE_NAMES.get(option, "out"))
            raise UsageError(f"{option} {path} is a folder; give a file name (e.g. {example})")
        folder = os.path.dirname(full)
        if not os.path.isdir(folder):
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise UsageError(f"{option} {path}: the folder {folder} {what}")
        if full in seen:
            raise UsageError(f"{option} and {seen[full]} name the same file {path}")
        seen[full] = option
        for source in inputs:
            if os.path.exists(full) and os.path.exists(source) and os.path.samefile(full, source):
                raise UsageError(f"{option} {path} would overwrite the input file {source}")
        if os.path.exists(full) and not os.access(full, os.W_OK):
            raise UsageError(f"{option} {path}: the file is not writable")
        if os.path.exists(full) and not os.path.isfile(full):  # a device or a FIFO (-o /dev/null)
            if option == "--save":  # saved whole, then renamed over it: that would replace the device
                raise UsageError(f"--save {path} is not a regular file; give a file name")
            continue  # written in place: no new file in its folder (/dev takes none)
        try:
            fd, probe = tempfile.mkstemp(prefix=".linreg-fused-", dir=folder)
        except OSError as err:
            raise UsageError(f"{option} {path}: cannot write in the folder {folder} ({err.strerror})") from None
        os.close(fd)
        os.unlink(probe)


# ---------------------------------------------------------------- the device

def device_for(name: str | None, backend: str) -> torch.device:
    """The device to run on, checked: CUDA present, the backend able to run there."""
    if name is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UsageError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    try:
        select_ops(backend, device)
    except RuntimeError as err:
        raise UsageError(str(err)) from None
    return device


# ---------------------------------------------------------------- the data's columns

def header(path: str, delimiter: str) -> list[str]:
    """The data file's column names; a name that appears twice is a DataError (which column
    would it be?), whatever the options."""
    names = column_names(path, delimiter=delimiter)
    seen = set()
    for name in names:
        if name in seen:
            raise DataError(f"{path}: the column name {name!r} appears twice in the header")
        seen.add(name)
    return names


def require_columns(path: str, available: list[str], wanted: list[str], delimiter: str) -> None:
    """A missing column names the columns there are, and the delimiter when the header looks
    like another one's (a ';'-separated file read with ',' has one column)."""
    missing = [n for n in wanted if n not in available]
    if not missing:
        return
    shown = ", ".join(available[:12]) + (f", … ({len(available)} in all)" if len(available) > 12 else "")
    message = f"{path}: no column {missing[0]!r} (columns: {shown})"
    other = other_delimiter(available, delimiter)
    if other is not None:
        message += f"; the header looks {other!r}-separated: pass --delimiter {_shell(other)}"
    raise DataError(message)


def _shell(delimiter: str) -> str:
    return {"\t": "tab", "|": "'|'", ";": "';'"}.get(delimiter, delimiter)


def as_tensor(values: np.ndarray, dtype: str, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=DTYPES[dtype]).to(device)


def check_range(path: str, names: list[str], values: np.ndarray, dtype: torch.dtype) -> None:
    """Every value of the (finite, float64) columns fits in ``dtype``; one beyond its range is a DataError
    naming the cell: it would be ±inf there (70000 in a float16 model), and so would its prediction."""
    limit = torch.finfo(dtype).max
    if dtype == torch.float64 or values.size == 0 or -limit <= values.min() <= values.max() <= limit:
        return  # the usual case, found without a copy of the table
    inf = torch.isinf(torch.as_tensor(values, dtype=dtype))  # just above the limit still rounds to it
    if inf.any():
        row, col = (int(i) for i in inf.nonzero()[0])
        name = str(dtype).removeprefix("torch.")
        raise DataError(f"{path}: row {row + 1}, column {names[col]!r}: {values[row, col]:g} is beyond {name}'s "
                        f"range (±{limit:.5g}); use --dtype float64")


# ---------------------------------------------------------------- metrics

def metrics(pred: torch.Tensor, true: torch.Tensor) -> dict[str, list[float]]:
    """Per target, in float64: MSE, RMSE and R² (1 − SSE/SST; NaN where the target is constant)."""
    pred, true = pred.double(), true.double()
    sse = ((pred - true) ** 2).sum(0)
    sst = ((true - true.mean(0)) ** 2).sum(0)
    mse = sse / true.shape[0]
    r2 = torch.where(sst > 0, 1 - sse / sst, torch.full_like(sst, float("nan")))
    return {"mse": mse.tolist(), "rmse": mse.sqrt().tolist(), "r2": r2.tolist()}
