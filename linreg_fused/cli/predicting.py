"""``linreg-fused predict``: a saved model's predictions for a data file, and its metrics
when the file holds the targets too."""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import sys
import warnings

import numpy as np
import torch

from ..io import DataError, read_columns
from ..module import FusedLinearRegressor
from ..replacing import replacing
from ..serialization import ModelFileError, read
from .common import DTYPES, check_input, check_outputs, check_range, device_for, header, metrics, require_columns
from .options import UsageError
from .report import metrics_table, to_json


def predict(args: argparse.Namespace) -> int:
    if args.json and not args.output:
        raise UsageError("--json prints the metrics on standard output; give -o OUT.csv for the predictions")
    check_input(args.model, "MODEL")
    check_input(args.data, "DATA")
    check_outputs({"-o": args.output}, inputs=(args.model, args.data))
    device = device_for(args.device, args.backend)
    # Read once: the names and the weights come from one file, even if a new model replaces it meanwhile.
    info, state = read(args.model)
    available = header(args.data, args.delimiter)
    if info.feature_names is not None:
        features = info.feature_names
        require_columns(args.data, available, features, args.delimiter)
    else:
        features = available
        if len(features) != info.in_features:
            raise UsageError(f"{args.model} records no feature names and expects {info.in_features} features; "
                             f"{args.data} has {len(features)} columns")
    names = info.target_names or [f"y{i}" for i in range(info.out_features)]
    # The targets are scored when the data hold every one of them (by the names the model records).
    scored = info.target_names is not None and all(n in available and n not in features for n in names)
    table = _read(args, features, names if scored else [])
    scored = scored and table.shape[1] > len(features)
    dtype = DTYPES[args.dtype] if args.dtype else info.dtype
    check_range(args.data, features, table[:, :len(features)], dtype)
    x = torch.as_tensor(table[:, :len(features)], dtype=dtype)
    model = FusedLinearRegressor(info.in_features, info.out_features, info.bias, device="meta", dtype=info.dtype,
                                 backend=args.backend).to_empty(device=device)
    model.load_state_dict(state)
    model = model.to(dtype)
    with torch.no_grad():
        pred = model(x.to(device)).cpu()
    overflow = ~torch.isfinite(pred)
    if overflow.any():
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise ModelFileError(f"{args.model}: the model's weights hold NaN or inf (saved after training diverged?)")
        # finite inputs and weights: the sums left the dtype's range
        row, col = (int(i) for i in overflow.nonzero()[0])
        name = str(dtype).removeprefix("torch.")
        tip = "; use --dtype float64" if dtype != torch.float64 else ""
        raise DataError(f"{args.data}: row {row + 1}: the prediction of {names[col]!r} is beyond {name}'s range{tip}")
    _write_csv(args.output, names, pred)
    values = metrics(pred, torch.from_numpy(table[:, len(features):])) if scored else None
    if args.json:  # the same keys whether the targets were scored or not
        print(to_json({"command": "predict", "model": args.model, "data": args.data, "rows": table.shape[0],
                       "dtype": str(dtype).removeprefix("torch."), "targets": names, "metrics": values,
                       "output": args.output}))
    elif values is not None:
        # Beside a CSV on standard output, the metrics go to standard error: the CSV stays clean.
        print(metrics_table(names, [("", values)]), file=sys.stdout if args.output else sys.stderr)
    return 0


def _read(args: argparse.Namespace, features: list[str], targets: list[str]) -> np.ndarray:
    """The feature columns, then the target columns when every value there is a number. A file of
    new rows often has the target columns empty: their predictions are written, unscored (one
    warning line), where reading them would fail on the first empty cell."""
    try:
        return read_columns(args.data, features + targets, engine=args.engine, delimiter=args.delimiter)
    except DataError as err:
        if not targets:
            raise
        table = read_columns(args.data, features, engine=args.engine, delimiter=args.delimiter)
        detail = " ".join(str(err).split())
        warnings.warn(f"the target columns are not scored: {detail}", RuntimeWarning, stacklevel=2)
        return table


def _write_csv(path: str | None, names: list[str], values: torch.Tensor) -> None:
    """A CSV with a header; each float written so that it reads back as the same value."""
    array = values.to(torch.float64 if values.dtype == torch.float64 else torch.float32).numpy()
    if path is None:
        _write_rows(None, names, array)
        return
    with _replacing(path) as written:
        _write_rows(written, names, array)


@contextlib.contextmanager
def _replacing(path: str):
    """replacing.replacing for -o: a device (-o /dev/null) is written in place; an OS error is a usage
    error saying the file was left as it was."""
    try:
        with replacing(path, special_in_place=True) as tmp:
            yield tmp
    except OSError as err:
        raise UsageError(f"-o {path}: cannot write ({err.strerror or err}); the file was left as it was") from None


def _write_rows(path: str | None, names: list[str], array: np.ndarray) -> None:
    """The CSV to ``path`` (None: standard output)."""
    if path is not None and array.nbytes > (1 << 20) and importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        from pyarrow import csv as pacsv

        table = pa.table({f"c{i}": array[:, i] for i in range(array.shape[1])})
        with open(path, "w", newline="", encoding="utf-8") as f:  # the header as the csv module quotes it
            _header(f, names)
        with open(path, "ab") as f:
            pacsv.write_csv(table, f, pacsv.WriteOptions(include_header=False))
        return
    digits = 17 if array.dtype == np.float64 else 9  # enough to round-trip
    out = sys.stdout if path is None else open(path, "w", newline="", encoding="utf-8")
    try:
        _header(out, names)
        np.savetxt(out, array, fmt=f"%.{digits}g", delimiter=",")
    finally:
        if out is not sys.stdout:
            out.close()


def _header(f, names: list[str]) -> None:
    csv.writer(f, lineterminator="\n").writerow(names)
