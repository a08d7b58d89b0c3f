"""The command line's parsers and option types.

Plain argparse and nothing heavier: ``linreg-fused --help`` and ``--version``
answer from here without importing torch or NumPy. The choices below repeat
linreg_fused.backend.BACKENDS and linreg_fused.io.ENGINES for that reason
(tests/test_cli.py checks that they agree).
"""

from __future__ import annotations

import argparse
import math

BACKENDS = ("auto", "triton", "torch")
ENGINES = ("auto", "pyarrow", "numpy")
DTYPES = ("float32", "float64")
DEFAULT_DTYPE = "float32"
SOLVERS = ("auto", "exact", "sgd")
# The SGD options: giving any of them makes --solver auto train with SGD. lr has no fixed
# default: it is derived from the data (see training.derived_lr).
SGD_OPTIONS = ("epochs", "batch_size", "lr", "momentum", "weight_decay")
SGD_DEFAULTS = {"epochs": 100, "batch_size": 32, "momentum": 0.0, "weight_decay": 0.0}
TUTORIAL = {"epochs": 100, "batch_size": 5, "lr": 1e-5}


class UsageError(Exception):
    """A bad command line, option, path or input: printed as one line, exit status 2."""


class Exit(Exception):
    """argparse finished the run itself (--help, --version): the exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line (a UsageError), not usage +
    message, and that returns from --help and --version instead of exiting the process."""

    def error(self, message: str):
        raise UsageError(f"{message} ({self.prog} --help lists the options)")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            raise UsageError(message.strip())
        raise Exit(status)


def version() -> str:
    from .. import __version__

    return f"linreg-fused {__version__}"


# ---------------------------------------------------------------- option types

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


def _delimiter(text: str) -> str:
    text = {"\\t": "\t", "tab": "\t"}.get(text, text)
    if len(text) != 1 or text in "\"\r\n":
        raise ValueError
    return text


for _type, _name in ((_positive_int, "positive integer"), (_non_negative_int, "integer >= 0"),
                     (_positive_float, "positive number"), (_non_negative_float, "number >= 0"),
                     (_fraction, "fraction in [0, 1)"), (_names, "comma-separated list of column names"),
                     (_delimiter, "one-character delimiter")):
    _type.__name__ = _name  # argparse's message: "invalid positive integer value: '0'"


# ---------------------------------------------------------------- shared options

def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto: Triton kernels where they can run, else the PyTorch reference (default)")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="CSV parser (default: pyarrow for files over 1 MB when it is installed, else numpy)")
    p.add_argument("--delimiter", type=_delimiter, default=",", metavar="CHAR",
                   help="CSV field separator (default ','; e.g. ';' or tab)")


# ---------------------------------------------------------------- the three parsers

def tutorial_parser() -> Parser:
    p = Parser(prog="linreg-fused", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Train on the tutorial's crop-yield data through the fused path: "
                           "100 epochs, batch 5, lr 1e-5, seed 0 by default, so every run prints the same lines.",
               epilog="commands:\n  linreg-fused train DATA --target COL[,COL...] ...   train on your data\n"
                      "  linreg-fused predict MODEL DATA [-o OUT.csv]         predict with a saved model\n"
                      "(linreg-fused train --help and linreg-fused predict --help show their options)")
    p.add_argument("--version", action="version", version=version())
    p.add_argument("--epochs", type=_positive_int, default=TUTORIAL["epochs"])
    p.add_argument("--batch-size", type=_positive_int, default=TUTORIAL["batch_size"])
    p.add_argument("--lr", type=_positive_float, default=TUTORIAL["lr"])
    p.add_argument("--momentum", type=_non_negative_float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the shuffling (default: 0)")
    p.add_argument("--log-every", type=_non_negative_int, default=10, help="0: no epoch log")
    p.add_argument("--quiet", action="store_true", help="print only the predictions")
    _add_device_options(p)
    return p


def train_parser() -> Parser:
    p = Parser(prog="linreg-fused train", description="Fit a linear regression to a data file, then show the "
               "model (coefficients per target, with standard errors where the exact solver gives them) and "
               "its MSE, RMSE and R² on the training (and validation) rows.")
    p.add_argument("data", metavar="DATA", help="CSV with a header row, .npy, .npz, or .parquet (needs pyarrow)")
    p.add_argument("--target", type=_names, required=True, metavar="COL[,COL...]", help="the target column(s)")
    p.add_argument("--features", type=_names, default=None, metavar="COL[,COL...]",
                   help="the feature columns (default: every other column)")
    p.add_argument("--solver", choices=SOLVERS, default="auto",
                   help="auto (default): exact unless an SGD option (--epochs, --batch-size, --lr, --momentum, "
                        "--weight-decay) is given, then sgd; exact: least squares, or ridge with --alpha; "
                        "sgd: mini-batch SGD")
    p.add_argument("--epochs", type=_positive_int, default=None, help=f"SGD epochs (default {SGD_DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"rows per SGD step (default {SGD_DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="SGD learning rate (default: derived from the data's second moments and the batch size, "
                        "stable for that batch size)")
    p.add_argument("--momentum", type=_non_negative_float, default=None, help="SGD momentum (default 0)")
    p.add_argument("--weight-decay", type=_non_negative_float, default=None, help="SGD L2 penalty (default 0)")
    p.add_argument("--alpha", type=_non_negative_float, default=None,
                   help="ridge penalty of the exact solver (default 0: least squares; the intercept is not "
                        "penalised)")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=None,
                   help="train on (x - mean) / std of the training rows (default: on for SGD, off for the exact "
                        "solver); the model shown and saved applies to raw values")
    p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                   help=f"the model's and the data's precision on the device (default {DEFAULT_DTYPE}); the "
                        "exact solver always solves in float64")
    p.add_argument("--val-fraction", type=_fraction, default=0.0, metavar="F",
                   help="hold out a random fraction F of the rows for validation (default 0)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed for the initial weights, the shuffling and the validation split (default 0)")
    _add_device_options(p)
    _add_data_options(p)
    p.add_argument("--save", metavar="MODEL", help="write the model to this .safetensors file")
    p.add_argument("--plot", metavar="PNG", help="draw the loss curve and predicted vs actual (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print the model and its metrics as one JSON object, "
                   "nothing else, on standard output")
    p.add_argument("--log-every", type=_non_negative_int, default=10, help="SGD epochs between log lines; 0: none")
    p.add_argument("--quiet", action="store_true", help="print only the model and its metrics")
    return p


def predict_parser() -> Parser:
    p = Parser(prog="linreg-fused predict", description="Predict with a saved model: a CSV whose header is the "
               "model's target names. When DATA also holds the target columns, print the MSE, RMSE and R² "
               "(on standard error when the predictions go to standard output).")
    p.add_argument("model", metavar="MODEL", help="a .safetensors file written by linreg-fused train --save")
    p.add_argument("data", metavar="DATA", help="CSV, .npy, .npz or .parquet holding the model's feature columns")
    p.add_argument("-o", "--output", metavar="OUT.csv", default=None, help="default: standard output")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="the precision to predict in (default: the model file's, float32 unless it was trained "
                        "with --dtype float64)")
    p.add_argument("--json", action="store_true",
                   help="print the metrics as JSON on standard output (needs -o for the predictions)")
    _add_device_options(p)
    _add_data_options(p)
    return p


def resolve_solver(args: argparse.Namespace) -> str:
    """"exact" or "sgd" for ``train``'s options; a UsageError for options of the other solver."""
    given = [f"--{k.replace('_', '-')}" for k in SGD_OPTIONS if getattr(args, k) is not None]
    solver = args.solver if args.solver != "auto" else ("sgd" if given else "exact")
    if solver == "exact" and given:
        raise UsageError(f"{given[0]} is an SGD option; --solver exact solves in one pass")
    if solver == "sgd" and args.alpha is not None:
        raise UsageError("--alpha is the ridge penalty of the exact solver; SGD's L2 penalty is --weight-decay")
    return solver
