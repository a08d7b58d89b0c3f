"""``linreg-fused train``: fit a model to a data file and show it."""

from __future__ import annotations

import argparse
import re
import sys
import warnings

import numpy as np
import torch

from ..backend import describe, select_ops
from ..io import read_columns
from ..module import FusedLinearRegressor
from ..optim import FusedSGD
from ..plot import require_matplotlib, training_plot
from ..serialization import fold_standardization
from ..stats import LinearStats
from .common import (DTYPES, as_tensor, check_input, check_outputs, check_range, device_for, header, metrics,
                     require_columns)
from .options import SGD_DEFAULTS, UsageError, resolve_solver
from .report import coefficient_table, metrics_table, to_json
from .summary import derived_lr, standard_errors


def train(args: argparse.Namespace) -> int:
    # Everything that can be wrong with the command line is found before the data are read.
    solver = resolve_solver(args)
    check_input(args.data, "DATA")
    check_outputs({"--save": args.save, "--plot": args.plot}, inputs=(args.data,))
    if args.plot:
        require_matplotlib()
    device = device_for(args.device, args.backend)
    standardize = args.standardize if args.standardize is not None else solver == "sgd"
    quiet = args.quiet or args.json
    say = (lambda *a: None) if quiet else print

    targets, features, table = _read(args)
    n_rows, d = table.shape[0], len(features)
    n_val = round(n_rows * args.val_fraction)
    if args.val_fraction and not 1 <= n_val < n_rows:
        raise UsageError(f"--val-fraction {args.val_fraction:g} of {n_rows} rows leaves "
                         f"{n_val} validation and {n_rows - n_val} training rows; both need at least one")
    if n_val:
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(args.seed)).numpy()
        train_table, val_table = table[np.sort(order[n_val:])], table[np.sort(order[:n_val])]
    else:
        train_table, val_table = table, None
    del table

    mean = scale = None
    if standardize:
        mean = train_table[:, :d].mean(0)
        scale = train_table[:, :d].std(0)
        scale[scale == 0] = 1.0  # a constant column: centred to zero, left unscaled

    def columns(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The float64 features (standardised when asked) and targets of a part of the table."""
        return (part[:, :d] if mean is None else (part[:, :d] - mean) / scale), part[:, d:]

    # The model trains in --dtype; the exact solver's statistics and the metrics use the float64 values
    # the file holds (rounding them to float32 first would cost the solve digits and skew the metrics).
    x64, t64 = columns(train_table)
    x, t = as_tensor(x64, args.dtype, device), as_tensor(t64, args.dtype, device)
    xv = tv = None
    if val_table is not None:
        xv64, tv64 = columns(val_table)
        xv, tv = as_tensor(xv64, args.dtype, device), as_tensor(tv64, "float64", device)
    # The metrics are the saved model's: for raw features in --dtype, as predict computes them (a model
    # folded for raw values loses digits in float32 where the features' offsets dwarf their spread).
    raw = raw_val = None
    if mean is not None:
        raw, raw_val = train_table[:, :d], None if val_table is None else val_table[:, :d]
    del train_table, val_table

    torch.manual_seed(args.seed)
    # Initialised on the CPU, then moved: a seed gives the same model on every device.
    model = FusedLinearRegressor(d, len(targets), dtype=DTYPES[args.dtype], backend=args.backend).to(device)
    say(f"linreg-fused: {describe(select_ops(args.backend, device), device)}, {args.dtype}")
    held_out = f" ({n_val} more held out for validation)" if n_val else ""
    scaled = ", standardized features" if standardize else ""
    history, val_history, stats, hp = None, None, None, None
    if solver == "exact":
        alpha = args.alpha or 0.0
        say(f"solving {model} exactly ({'ridge, alpha ' + format(alpha, 'g') if alpha else 'least squares'}) "
            f"on {x.shape[0]} rows{held_out}{scaled}")
        stats = LinearStats.from_arrays(x64, t64, device=device, backend=args.backend)
        model.solve(stats, alpha=alpha)
    else:
        hp = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SGD_DEFAULTS.items()}
        hp["lr"], derived = args.lr, args.lr is None
        if derived:
            stats = LinearStats.from_tensors(x, t, backend=args.backend)
            hp["lr"] = derived_lr(stats, x, hp["batch_size"], hp["momentum"], hp["weight_decay"])
        say(f"training {model} on {x.shape[0]} rows{held_out}: {hp['epochs']} epochs, batch {hp['batch_size']}, "
            f"lr {hp['lr']:.4g}" + (" (derived from the data)" if derived else "")
            + (f", momentum {hp['momentum']:g}" if hp["momentum"] else "")
            + (f", weight decay {hp['weight_decay']:g}" if hp["weight_decay"] else "") + f"{scaled}, seed {args.seed}")
        opt = FusedSGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"],
                       weight_decay=hp["weight_decay"], backend=args.backend)
        log_every = None if quiet else args.log_every or None
        fit_kwargs = dict(epochs=hp["epochs"], batch_size=hp["batch_size"], optimizer=opt, seed=args.seed,
                          progress=False if quiet else None)
        if xv is None:
            history = model.fit(x, t, log_every=log_every, **fit_kwargs)
        else:
            log = _ValidationLog(model, xv, tv, log_every)
            history = model.fit(x, t, log_every=1, print_fn=log, **fit_kwargs)
            val_history = log.history

    if mean is not None:  # show and save weights for raw features; the standardisation goes in the metadata
        weight, bias = fold_standardization(model.weight, model.bias, torch.from_numpy(mean), torch.from_numpy(scale))
        with torch.no_grad():
            model.weight.copy_(weight)
            model.bias.copy_(bias)
        x = as_tensor(raw, args.dtype, device)
        xv = None if raw_val is None else as_tensor(raw_val, args.dtype, device)
    with torch.no_grad():
        pred = model(x)
        pred_val = model(xv) if xv is not None else None
    t64 = as_tensor(t64, "float64", device)
    del x64
    parts = [("train", metrics(pred, t64))] + ([("val", metrics(pred_val, tv))] if pred_val is not None else [])
    coef, intercept = model.weight.detach().double().cpu(), model.bias.detach().double().cpu()
    errors = standard_errors(stats, args.alpha or 0.0, scale) if solver == "exact" else None
    _warn_if_worse_than_the_mean(targets, parts[0][1]["r2"], _tips(args, solver, standardize))

    if args.json:
        print(to_json(_payload(args, solver, standardize, features, targets, coef, intercept, errors, parts,
                               hp, history, x.shape[0], n_val, device)))
    else:
        say("")
        print(coefficient_table(features, targets, coef.tolist(), intercept.tolist(), **(errors or {})))
        print("")
        print(metrics_table(targets, parts))

    if args.save:
        model.save(args.save, feature_names=features, target_names=targets,
                   input_mean=None if mean is None else mean.tolist(),
                   input_scale=None if scale is None else scale.tolist())
        say(f"saved the model to {args.save}")
    if args.plot:
        shown_pred, shown_true = (pred_val, tv) if pred_val is not None else (pred, t64)
        training_plot(args.plot, history if history is not None else [], val_history=val_history,
                      predicted=shown_pred, actual=shown_true, target_names=targets,
                      rows_label="validation rows" if pred_val is not None else "training rows")
        say(f"wrote the plot to {args.plot}")
    return 0


def _read(args: argparse.Namespace) -> tuple[list[str], list[str], np.ndarray]:
    """The target and feature names, checked, and their columns (features first) as float64."""
    targets = args.target
    available = header(args.data, args.delimiter)
    require_columns(args.data, available, targets + (args.features or []), args.delimiter)
    for option, names in (("--target", targets), ("--features", args.features or [])):
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise UsageError(f"{option} names the column {twice!r} twice")
    # A column without a name is no variable: pandas' index (to_csv's first column), whose row numbers
    # would enter the model as a feature, and make predictions depend on where a row sits in a file.
    features = args.features or [n for n in available if n not in targets and n != ""]
    if not args.features and "" in available:
        warnings.warn("the column without a name (pandas' index?) is not a feature; name it in the header to "
                      "use it", RuntimeWarning, stacklevel=2)
    both = [n for n in targets if n in features]
    if both:
        raise UsageError(f"column {both[0]!r} is both a feature and a target")
    if not features:
        raise UsageError(f"{args.data}: no feature columns left besides the target(s)")
    table = read_columns(args.data, features + targets, engine=args.engine, delimiter=args.delimiter)
    check_range(args.data, features + targets, table, DTYPES[args.dtype])  # every value fits in --dtype
    return targets, features, table


def _warn_if_worse_than_the_mean(targets: list[str], r2: list[float], tips: str) -> None:
    """One line when a target's training R² is below 0, the intercept-only model's: the fit is
    worse than predicting the mean, and the line says what to try."""
    worst = min(range(len(targets)), key=lambda i: r2[i] if r2[i] == r2[i] else float("inf"))
    if r2[worst] < 0:
        print(f"linreg-fused: warning: training R² of {targets[worst]!r} is {r2[worst]:.4g}, below the 0 of "
              f"predicting its mean: the fit is useless; try {tips}", file=sys.stderr)


def _tips(args: argparse.Namespace, solver: str, standardize: bool) -> str:
    if solver == "exact":
        return "--dtype float64" + ("" if standardize else ", or --standardize")
    tips = ["--solver exact (without SGD options)", "more --epochs"]
    if args.lr is not None:
        tips.insert(0, "leaving --lr out (it is then derived from the data)")
    if not standardize:
        tips.insert(0, "leaving --no-standardize out")
    return ", ".join(tips[:-1]) + ", or " + tips[-1]


def _payload(args, solver, standardize, features, targets, coef, intercept, errors, parts, hp, history,
             n_train, n_val, device) -> dict:
    payload = {
        "command": "train", "data": args.data, "solver": solver, "dtype": args.dtype, "device": str(device),
        "backend": select_ops(args.backend, device).name, "standardize": standardize,
        "rows": {"train": n_train, "val": n_val}, "features": features, "targets": targets,
        "coef": coef.tolist(), "intercept": intercept.tolist(),
    }
    for key, values in (errors or {}).items():
        payload[key] = values
    payload["metrics"] = dict(parts)
    if solver == "exact":
        payload["alpha"] = args.alpha or 0.0
    else:
        payload["sgd"] = dict(hp, lr_derived=args.lr is None, seed=args.seed)
        payload["loss_history"] = history
    payload["saved"], payload["plot"] = args.save, args.plot
    return payload


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
