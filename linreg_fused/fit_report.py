"""fit's report points: the tutorial's log lines, the progress bar, and divergence.

The host reads the device only at report points (``log_every``, the
progress bar, the end). Each epoch leaves a row of three numbers on the
device: its mean batch loss, its last batch's loss, and whether the
parameters were finite at its end (1 or 0). An epoch diverged when its loss
or its end parameters are not finite: the loss is taken before each step, so
a last step that overflows shows in the parameters alone.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

FINITE_COLUMN = 2  # of an epoch's row: 1.0 when the parameters were finite at its end


class TrainingDivergedError(FloatingPointError):
    """A non-finite loss, or non-finite parameters, appeared during fit.

    epoch: the 1-based epoch whose mean loss, or whose end parameters, were
    not finite; history: the per-epoch losses up to and including that epoch.
    """

    def __init__(self, message: str, epoch: int, history: list[float]) -> None:
        super().__init__(message)
        self.epoch, self.history = epoch, history


class Reporter:
    """Prints the tutorial's log lines and drives a tqdm progress bar, at report points only."""

    def __init__(self, epochs: int, log_every: int | None, progress: bool, print_fn: Callable[[str], None]) -> None:
        self.epochs, self.log_every, self.print_fn = epochs, log_every, print_fn
        self.bar = None
        if progress:
            from tqdm.auto import tqdm  # handles terminals and notebooks

            self.bar = tqdm(total=epochs, unit="epoch", leave=True)

    def chunk_end(self, epoch: int) -> int:
        """The epoch (exclusive) of the next report point after ``epoch``."""
        stops = [self.epochs]
        if self.log_every:
            stops.append((epoch // self.log_every + 1) * self.log_every)
        if self.bar is not None:
            stops.append(epoch + max(1, self.epochs // 100))
        return min(stops)

    def report(self, done: int, history: list[float], last_batch: list[float]) -> None:
        if self.log_every and done % self.log_every == 0:
            # Through tqdm while a bar is drawn, so the line does not tear it.
            emit = self.bar.write if self.bar is not None and self.print_fn is print else self.print_fn
            emit(f"Epoch [{done}/{self.epochs}], Loss: {last_batch[done - 1]:.4f}, "
                 f"Epoch mean loss: {history[done - 1]:.4f}")
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            self.bar.set_postfix(loss=f"{history[done - 1]:.4g}", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def first_bad_epoch(means: tuple[float, ...], flags: tuple[float, ...], start: int) -> int | None:
    """The first epoch (absolute) of a chunk whose mean loss (``means``) or end parameters (``flags``)
    are not finite."""
    if math.isfinite(sum(means)) and min(flags) == 1.0:
        return None  # the common case in one pass (a sum that overflows only sends it to the scan)
    for i, (mean, flag) in enumerate(zip(means, flags)):
        if not math.isfinite(mean) or flag != 1.0:
            return start + i
    return None


def diverged(bad: int, epochs: int, history: list[float], optimizer, data_checked: bool = True
             ) -> TrainingDivergedError:
    """The error for a divergence at 0-based epoch ``bad``, its history ending with that epoch.
    data_checked: whether fit scanned the data for NaN/inf (else the message names them as a cause)."""
    lrs = sorted({float(g["lr"]) for g in optimizer.param_groups})
    where = ("their values before fit" if bad == 0 else f"the end of epoch {bad}, the last finite one")
    others = "" if isinstance(optimizer, torch.optim.SGD) else (
        " Optimizer state other than SGD momentum buffers was not restored.")
    what = (f"non-finite loss ({history[bad]})" if not math.isfinite(history[bad]) else
            f"non-finite parameters after the steps (the loss before them was {history[bad]:.6g})")
    return TrainingDivergedError(
        f"{what} at epoch {bad + 1}/{epochs}: training diverged. The parameters were restored to {where}."
        f"{others} Try a smaller learning rate (lr={lrs[0] if len(lrs) == 1 else lrs} now)"
        + ("." if data_checked else ", and check the data: fit did not scan them for NaN or inf (an iterable's "
           "batches, or check_finite=False), and one in a batch diverges the same way."),
        bad + 1, history)


def parameters_finite(params: list[torch.Tensor]) -> torch.Tensor:
    """A 0-d bool on the device: every parameter is finite (no sync)."""
    flags = [torch.isfinite(p).all() for p in params]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


class LastFinite:
    """On-device copy of the parameters and SGD momentum buffers as they were
    at the end of the last epoch whose loss and end parameters were finite
    (updated with torch.where, so keeping it costs no sync). Its tensors stay
    the same from fit to fit (``start`` refills them), so a CUDA graph may
    hold them; it holds no optimizer, only the buffers it is given."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params
        self.all_finite = torch.ones((), dtype=torch.bool, device=params[0].device)
        self.saved = [p.detach().clone() for p in params]
        self.saved_buffers: list[torch.Tensor | None] = [None] * len(params)
        self.before_fit: list[torch.Tensor | None] = [None] * len(params)

    def start(self, buffers: list[torch.Tensor | None], fresh: bool = False) -> None:
        """The state before this fit (``buffers``: each parameter's momentum buffer or None): what a
        divergence in its first epoch goes back to. fresh: ``saved`` was just cloned from the parameters."""
        self.all_finite.fill_(True)
        if not fresh:
            for saved, p in zip(self.saved, self.params):
                saved.copy_(p.detach())
        self.before_fit = [None if buf is None else buf.clone() for buf in buffers]
        for i, buf in enumerate(buffers):
            kept = self.saved_buffers[i]
            if buf is None or kept is None or kept.shape != buf.shape or kept.dtype != buf.dtype:
                self.saved_buffers[i] = self.before_fit[i]
            else:  # refilled in place: a CUDA graph may hold it
                kept.copy_(buf)

    def epoch_end(self, row: torch.Tensor, buffers: list[torch.Tensor | None]) -> None:
        """After an epoch whose row (mean loss, last loss, -) is ``row``: write its finite flag, keep its state."""
        finite = parameters_finite(self.params)
        row[FINITE_COLUMN] = finite
        self.all_finite &= torch.isfinite(row[0]) & finite
        for saved, p in zip(self.saved, self.params):
            saved.copy_(torch.where(self.all_finite, p.detach(), saved))
        for i, buf in enumerate(buffers):
            if buf is None:
                continue
            if self.saved_buffers[i] is None:  # created in this fit's first step; valid if that epoch was finite
                self.saved_buffers[i] = buf.clone()
            else:
                self.saved_buffers[i].copy_(torch.where(self.all_finite, buf, self.saved_buffers[i]))

    @torch.no_grad()
    def restore(self, bad_epoch: int, optimizer: torch.optim.Optimizer) -> None:
        """Back to the end of the last finite epoch (or to before fit when ``bad_epoch`` is the first)."""
        for i, p in enumerate(self.params):
            p.copy_(self.saved[i])
            buf = self.before_fit[i] if bad_epoch == 0 else self.saved_buffers[i]
            state = optimizer.state.get(p, {})
            if buf is None:
                state.pop("momentum_buffer", None)
            elif state.get("momentum_buffer") is not None:
                state["momentum_buffer"].copy_(buf)


def momentum_buffers(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """Each parameter's SGD momentum buffer, or None."""
    return [optimizer.state[p].get("momentum_buffer") if p in optimizer.state else None for p in params]
