"""The linreg-fused command line.

    linreg-fused                                  # the tutorial: crop yields, 100 epochs, batch 5, lr 1e-5, seed 0
    linreg-fused train DATA --target COL[,COL...] [--save MODEL] [--plot PNG] [--json] ...
    linreg-fused predict MODEL DATA [-o OUT.csv] [--json]
    linreg-fused --version

DATA is a CSV file with a header row, a .npy/.npz file, or Parquet (see
linreg_fused.io). A bad option, path or data file prints one line and exits
with status 2 before any work; a diverged training prints one line and exits
with status 1; warnings print as one line each.

This module and .options import nothing heavy: --help and --version answer
without importing torch; each command imports what it needs when it runs.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Sequence

from .options import Exit, UsageError, predict_parser, train_parser, tutorial_parser

__all__ = ["main", "UsageError"]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return _run(argv)
    except Exit as done:  # --help, --version
        return done.status
    except UsageError as err:
        return _fail(err, 2)
    except BrokenPipeError:  # e.g. `linreg-fused predict ... | head`: the reader left, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        status = _status_of(err)
        if status is None:
            raise
        return _fail(err, status)


def _run(argv: list[str]) -> int:
    if argv[:1] == ["train"]:
        args = train_parser().parse_args(argv[1:])
        from .training import train

        return train(args)
    if argv[:1] == ["predict"]:
        args = predict_parser().parse_args(argv[1:])
        from .predicting import predict

        return predict(args)
    args = tutorial_parser().parse_args(argv)
    from .tutorial import tutorial

    return tutorial(args)


def _status_of(err: Exception) -> int | None:
    """The exit status of an error the user can act on from its one line; None for a bug."""
    # Imported here, after a command ran (so they are loaded), to keep --help free of torch.
    from ..io import DataError
    from ..plot import MissingExtraError
    from ..serialization import ModelFileError
    from ..train import TrainingDivergedError

    if isinstance(err, TrainingDivergedError):
        return 1
    if isinstance(err, (DataError, ModelFileError, MissingExtraError)):
        return 2
    return None


def _fail(err: Exception, status: int) -> int:
    print(f"linreg-fused: error: {_one_line(err)}", file=sys.stderr)
    return status


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command line: the message alone, on one line (no source
    path or code line, which say nothing to someone who did not write the code)."""
    print(f"linreg-fused: warning: {_one_line(message)}", file=sys.stderr if file is None else file)


def _one_line(message) -> str:
    return " ".join(str(message).split())
