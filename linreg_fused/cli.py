"""The linreg-fused command line.

    linreg-fused                                  # the tutorial: crop yields, 100 epochs, batch 5, lr 1e-5, seed 0
    linreg-fused train DATA --target COL[,COL...] [--save MODEL] [--plot PNG] ...
    linreg-fused predict MODEL DATA [-o OUT.csv]

DATA is a CSV file with a header row, a .npy/.npz file, or Parquet (see
linreg_fused.io). A bad option or bad data prints one line and exits with
status 2; a diverged training prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import re
import sys
from typing import Sequence

import numpy as np
import torch

from .backend import BACKENDS, describe, select_ops
from .data import FEATURES, TARGETS, crop_yields
from .io import ENGINES, DataError, column_names, read_columns
from .module import FusedLinearRegressor
from .optim import FusedSGD
from .plot import MissingExtraError, require_matplotlib, training_plot
from .serialization import ModelFileError, fold_standardization, read_info
from .train import TrainingDivergedError

NEW_REGION = (75.0, 63.0, 44.0)  # temp, rainfall, humidity
SGD_DEFAULTS = {"epochs": 100, "batch_size": 32, "lr": 1e-5, "momentum": 0.0, "weight_decay": 0.0}
STANDARDIZED_LR = 0.01


class UsageError(Exception):
    """A bad command line, option or input: printed as one line, exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["train"]:
            return _train(_train_parser().parse_args(argv[1:]))
        if argv[:1] == ["predict"]:
            return _predict(_predict_parser().parse_args(argv[1:]))
        return _tutorial(_tutorial_parser().parse_args(argv))
    except (UsageError, DataError, ModelFileError, MissingExtraError) as err:
        print(f"linreg-fused: error: {err}", file=sys.stderr)
        return 2
    except TrainingDivergedError as err:
        print(f"linreg-fused: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `linreg-fused predict ... | head`: the reader left, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


# ---------------------------------------------------------------- parsers

class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (a UsageError), not usage + message."""

    def error(self, message: str):
        raise UsageError(f"{message} ({self.prog} --help lists the options)")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ValueError
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise ValueError
    return names


for _type, _name in ((_positive_int, "positive integer"), (_non_negative_int, "integer >= 0"),
                     (_positive_float, "positive number"), (_non_negative_float, "number >= 0"),
                     (_fraction, "fraction in [0, 1)"), (_names, "comma-separated list of column names")):
    _type.__name__ = _name  # argparse's message: "invalid positive integer value: '0'"


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: Triton kernels where they can run, else the PyTorch reference (default)")


def _tutorial_parser() -> _Parser:
    p = _Parser(prog="linreg-fused", formatter_class=argparse.RawDescriptionHelpFormatter,
                description="Train on the tutorial's crop-yield data through the fused path: "
                            "100 epochs, batch 5, lr 1e-5, seed 0 by default, so every run prints the same lines.",
                epilog="commands:\n  linreg-fused train DATA --target COL[,COL...] ...   train on your data\n"
                       "  linreg-fused predict MODEL DATA [-o OUT.csv]         predict with a saved model\n"
                       "(linreg-fused train --help and linreg-fused predict --help show their options)")
    p.add_argument("--epochs", type=_positive_int, default=100)
    p.add_argument("--batch-size", type=_positive_int, default=5)
    p.add_argument("--lr", type=_positive_float, default=1e-5)
    p.add_argument("--momentum", type=_non_negative_float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the shuffling (default: 0)")
    p.add_argument("--log-every", type=_non_negative_int, default=10, help="0: no epoch log")
    p.add_argument("--quiet", action="store_true", help="print only the predictions")
    _add_device_options(p)
    return p


def _train_parser() -> _Parser:
    p = _Parser(prog="linreg-fused train", description="Train a linear regression on a data file; print the "
                "tutorial's epoch log, then the MSE and R² per target on the training (and validation) rows.")
    p.add_argument("data", metavar="DATA", help="CSV with a header row, .npy, .npz, or .parquet (needs pyarrow)")
    p.add_argument("--target", type=_names, required=True, metavar="COL[,COL...]", help="the target column(s)")
    p.add_argument("--features", type=_names, default=None, metavar="COL[,COL...]",
                   help="the feature columns (default: every other column)")
    p.add_argument("--solver", choices=("sgd", "exact"), default="sgd",
                   help="sgd: the tutorial's mini-batch SGD (default); exact: least squares, or ridge with --alpha")
    p.add_argument("--epochs", type=_positive_int, default=None, help=f"SGD epochs (default {SGD_DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"rows per SGD step (default {SGD_DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"learning rate (default {SGD_DEFAULTS['lr']:g}, the tutorial's; {STANDARDIZED_LR:g} "
                        f"with --standardize)")
    p.add_argument("--momentum", type=_non_negative_float, default=None, help="SGD momentum (default 0)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=None, help="SGD L2 penalty (default 0)")
    p.add_argument("--alpha", type=_non_negative_float, default=None,
                   help="ridge penalty of --solver exact (default 0: least squares; the intercept is not penalised)")
    p.add_argument("--standardize", action="store_true",
                   help="train on (x - mean) / std of the training rows; the saved model applies to raw values")
    p.add_argument("--val-fraction", type=_fraction, default=0.0, metavar="F",
                   help="hold out a random fraction F of the rows for validation (default 0)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the initial weights, the shuffling and the validation split (default 0)")
    _add_device_options(p)
    p.add_argument("--engine", choices=ENGINES, default="auto", help="CSV parser (default: pyarrow if installed)")
    p.add_argument("--save", metavar="MODEL", help="write the model to this .safetensors file")
    p.add_argument("--plot", metavar="PNG", help="draw the loss curve and predicted vs actual (needs matplotlib)")
    p.add_argument("--log-every", type=_non_negative_int, default=10, help="epochs between log lines; 0: none")
    p.add_argument("--quiet", action="store_true", help="print only the final MSE / R² table")
    return p


def _predict_parser() -> _Parser:
    p = _Parser(prog="linreg-fused predict", description="Predict with a saved model; writes a CSV whose header "
                "is the model's target names.")
    p.add_argument("model", metavar="MODEL", help="a .safetensors file written by linreg-fused train --save")
    p.add_argument("data", metavar="DATA", help="CSV, .npy, .npz or .parquet holding the model's feature columns")
    p.add_argument("-o", "--output", metavar="OUT.csv", default=None, help="default: standard output")
    _add_device_options(p)
    p.add_argument("--engine", choices=ENGINES, default="auto", help="CSV parser (default: pyarrow if installed)")
    return p


# ---------------------------------------------------------------- shared

def _device(name: str | None, backend: str) -> torch.device:
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


def _writable(path: str, option: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")


# ---------------------------------------------------------------- linreg-fused (the tutorial)

def _tutorial(args: argparse.Namespace) -> int:
    device = _device(args.device, args.backend)
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
    print("\npredictions vs targets (apples, oranges):")
    for p, t in zip(preds.tolist(), targets.tolist()):
        print(f"  {p[0]:8.2f} {p[1]:8.2f}    {t[0]:6.0f} {t[1]:6.0f}")
    print(f"\nnew region (temp {NEW_REGION[0]:g}, rainfall {NEW_REGION[1]:g}, humidity {NEW_REGION[2]:g}): "
          f"apples {new[0, 0]:.2f}, oranges {new[0, 1]:.2f}")
    return 0


# ---------------------------------------------------------------- linreg-fused train

def _train(args: argparse.Namespace) -> int:
    _check_solver_options(args)
    device = _device(args.device, args.backend)
    if args.plot:
        require_matplotlib()  # before the training, not after it
        _writable(args.plot, "--plot")
    if args.save:
        _writable(args.save, "--save")
    say = (lambda *a: None) if args.quiet else print

    targets = args.target
    features = args.features or [n for n in column_names(args.data) if n not in targets]
    both = [n for n in targets if n in features]
    if both:
        raise UsageError(f"column {both[0]!r} is both a feature and a target")
    for kind, names in (("--target", targets), ("--features", features)):
        if len(set(names)) != len(names):
            raise UsageError(f"{kind} names a column twice")
    if not features:
        raise UsageError(f"{args.data}: no feature columns left besides the target(s)")
    table = read_columns(args.data, features + targets, engine=args.engine)
    n_rows = table.shape[0]

    n_val = round(n_rows * args.val_fraction)
    if args.val_fraction and not 1 <= n_val < n_rows:
        raise UsageError(f"--val-fraction {args.val_fraction:g} of {n_rows} rows leaves "
                         f"{n_val} validation and {n_rows - n_val} training rows; both need at least one")
    if n_val:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(args.seed)).numpy()
        train_rows, val_rows = np.sort(order[n_val:]), np.sort(order[:n_val])
        train_table, val_table = table[train_rows], table[val_rows]
    else:
        train_table, val_table = table, None
    del table

    d = len(features)
    mean = scale = None
    if args.standardize:
        mean = train_table[:, :d].mean(0)
        scale = train_table[:, :d].std(0)
        scale[scale == 0] = 1.0  # a constant column: centred to zero, left unscaled

    def tensors(part: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = part[:, :d] if mean is None else (part[:, :d] - mean) / scale
        return (torch.as_tensor(x, dtype=torch.float32).to(device),
                torch.as_tensor(part[:, d:], dtype=torch.float32).to(device))

    x, t = tensors(train_table)
    xv, tv = tensors(val_table) if val_table is not None else (None, None)
    del train_table, val_table

    torch.manual_seed(args.seed)
    model = FusedLinearRegressor(d, len(targets), backend=args.backend).to(device)  # CPU init, as above
    say(f"linreg-fused: {describe(select_ops(args.backend, device), device)}")
    held_out = f" ({n_val} more held out for validation)" if n_val else ""
    history, val_history = None, None
    if args.solver == "exact":
        say(f"solving {model} exactly ({'ridge, alpha ' + format(args.alpha, 'g') if args.alpha else 'least squares'})"
            f" on {x.shape[0]} rows{held_out}")
        model.solve(x, t, alpha=args.alpha or 0.0)
    else:
        hp = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SGD_DEFAULTS.items()}
        if args.lr is None and args.standardize:
            hp["lr"] = STANDARDIZED_LR
        say(f"training {model} on {x.shape[0]} rows{held_out}: {hp['epochs']} epochs, batch {hp['batch_size']}, "
            f"lr {hp['lr']:g}" + (f", momentum {hp['momentum']:g}" if hp["momentum"] else "")
            + (f", weight decay {hp['weight_decay']:g}" if hp["weight_decay"] else "")
            + (", standardized features" if args.standardize else "") + f", seed {args.seed}")
        opt = FusedSGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                       weight_decay=hp["weight_decay"], backend=args.backend)
        log_every = None if args.quiet else args.log_every or None
        fit_kwargs = dict(epochs=hp["epochs"], batch_size=hp["batch_size"], optimizer=opt, seed=args.seed,
                          progress=False if args.quiet else None)
        if xv is None:
            history = model.fit(x, t, log_every=log_every, **fit_kwargs)
        else:
            log = _ValidationLog(model, xv, tv, log_every)
            history = model.fit(x, t, log_every=1, print_fn=log, **fit_kwargs)
            val_history = log.history

    with torch.no_grad():
        pred = model(x)
        pred_val = model(xv) if xv is not None else None
    rows = [("train", _metrics(pred, t))]
    if pred_val is not None:
        rows.append(("val", _metrics(pred_val, tv)))
    say("")
    print(_metrics_table(targets, rows))

    if args.save:
        if mean is not None:  # save weights for raw features; the standardisation goes in the metadata
            weight, bias = fold_standardization(model.weight, model.bias, torch.from_numpy(mean),
                                                torch.from_numpy(scale))
            with torch.no_grad():
                model.weight.copy_(weight)
                model.bias.copy_(bias)
        model.save(args.save, feature_names=features, target_names=targets,
                   input_mean=None if mean is None else mean.tolist(),
                   input_scale=None if scale is None else scale.tolist())
        say(f"saved the model to {args.save}")
    if args.plot:
        shown_pred, shown_true = (pred_val, tv) if pred_val is not None else (pred, t)
        training_plot(args.plot, history if history is not None else [], val_history=val_history,
                      predicted=shown_pred, actual=shown_true, target_names=targets,
                      rows_label="validation rows" if pred_val is not None else "training rows")
        say(f"wrote the plot to {args.plot}")
    return 0


def _check_solver_options(args: argparse.Namespace) -> None:
    if args.solver == "exact":
        given = [f"--{k.replace('_', '-')}" for k in SGD_DEFAULTS if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{given[0]} is an SGD option; --solver exact solves in one pass")
    elif args.alpha is not None:
        raise UsageError("--alpha is the ridge penalty of --solver exact; SGD's L2 penalty is --weight-decay")


class _ValidationLog:
    """fit's print_fn while fit reports every epoch: records the validation MSE
    after each epoch and prints the tutorial's line, with it, every
    ``log_every`` epochs."""

    _EPOCH = re.compile(r"Epoch \[(\d+)/")

    def __init__(self, model, x: torch.Tensor, t: torch.Tensor, log_every: int | None) -> None:
        self.model, self.x, self.t, self.log_every = model, x, t, log_every
        self.history: list[float] = []

    def __call__(self, line: str) -> None:
        match = self._EPOCH.match(line)
        if match is None:
            print(line)
            return
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(self.model(self.x).double(), self.t.double()))
        self.history.append(val)
        epoch = int(match.group(1))
        if self.log_every and epoch % self.log_every == 0:
            print(f"{line}, Validation MSE: {val:.4f}")


def _metrics(pred: torch.Tensor, true: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per target: MSE and R² (1 − SSE/SST; NaN where the target is constant), in float64."""
    pred, true = pred.double(), true.double()
    sse = ((pred - true) ** 2).sum(0)
    sst = ((true - true.mean(0)) ** 2).sum(0)
    mse = (sse / true.shape[0]).tolist()
    r2 = torch.where(sst > 0, 1 - sse / sst, torch.full_like(sst, float("nan"))).tolist()
    return mse, r2


def _metrics_table(targets: list[str], rows: list[tuple[str, tuple[list[float], list[float]]]]) -> str:
    width = max(8, *(len(n) for n in targets))
    head = f"{'target':<{width}}" + "".join(f"  {f'{part} MSE':>12}  {f'{part} R²':>10}" for part, _ in rows)
    lines = [head]
    for i, name in enumerate(targets):
        cells = "".join(f"  {mse[i]:>12.6g}  {_r2(r2[i]):>10}" for _, (mse, r2) in rows)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def _r2(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.6f}"


# ---------------------------------------------------------------- linreg-fused predict

def _predict(args: argparse.Namespace) -> int:
    device = _device(args.device, args.backend)
    if args.output:
        _writable(args.output, "-o")
    info = read_info(args.model)
    if info.feature_names is not None:
        features = info.feature_names
    else:
        features = column_names(args.data)
        if len(features) != info.in_features:
            raise UsageError(f"{args.model} records no feature names and expects {info.in_features} features; "
                             f"{args.data} has {len(features)} columns")
    x = read_columns(args.data, features, engine=args.engine)
    model = FusedLinearRegressor.load(args.model, device=device, backend=args.backend)
    with torch.no_grad():
        pred = model(torch.as_tensor(x, dtype=model.weight.dtype).to(device)).cpu()
    names = info.target_names or [f"y{i}" for i in range(info.out_features)]
    _write_csv(args.output, names, pred)
    return 0


def _write_csv(path: str | None, names: list[str], values: torch.Tensor) -> None:
    """A CSV with a header; each float written so that it reads back as the same value."""
    array = values.to(torch.float64 if values.dtype == torch.float64 else torch.float32).numpy()
    if path is not None and importlib.util.find_spec("pyarrow") is not None:
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
    import csv

    csv.writer(f, lineterminator="\n").writerow(names)
