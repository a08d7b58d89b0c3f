"""fit's row orders: DataLoader's, drawn in bulk on the host, or drawn on the device.

``dataloader_orders`` gives each epoch's order exactly as
``DataLoader(dataset, shuffle=True, generator=g)`` draws it, and leaves ``g``
(or the global RNG) where DataLoader leaves it. Per epoch DataLoader's
iterator draws an int64 base seed from the generator, then RandomSampler
draws ``randperm(N)`` from it (without a generator: from a fresh generator
seeded by a second int64 of the global RNG) and, once exhausted, one more
``randperm(N)`` of which it keeps nothing. A CPU generator is an MT19937:
an int64 takes two of its 32-bit outputs (high word first) and
``randperm(N)`` is a Fisher-Yates shuffle that takes N-1, the i-th swap
being with ``i + output % (N - i)``. So every epoch of a chunk can be drawn
at once: three calls take all the outputs from the generator
(``_raw_outputs``), and the shuffles run as N-1 vectorised swaps over all
epochs. That is taken where it is cheaper than PyTorch's calls (N up to the
number of epochs, e.g. the tutorial: 15 rows, 100 epochs) and only after a
self-check against PyTorch's own draws; otherwise the same calls as
DataLoader, reusing one generator and writing into one buffer.

``device_orders`` (fit's ``shuffle="device"``) draws a chunk's permutations on
the model's device in one go: the argsort of random 63-bit keys per epoch,
from a generator on that device seeded from ``seed=`` (or from one draw of
the given generator or the global RNG). Reproducible for a seed on a given
device and PyTorch version; not DataLoader's order.
"""

from __future__ import annotations

import functools

import numpy as np
import torch


def dataloader_orders(n_rows: int, n_epochs: int, shuffle: bool, generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """(n_epochs, n_rows) int64 on ``device``: the row order of each epoch, as
    ``DataLoader(dataset, shuffle=shuffle, generator=generator)`` draws it
    (the global RNG when generator is None). A CUDA generator draws on the
    device instead (not DataLoader's order)."""
    if generator is not None and generator.device.type != "cpu":
        return torch.stack([torch.randperm(n_rows, generator=generator, device=device) for _ in range(n_epochs)])
    if not shuffle:
        _draw_base_seeds(n_epochs, generator)
        orders = torch.arange(n_rows).expand(n_epochs, -1)
    elif generator is not None:
        orders = _orders_from(generator, n_rows, n_epochs)
    else:
        orders = _orders_from_global_rng(n_rows, n_epochs)
    if device.type == "cuda":  # pinned, so the copy queues behind the running epochs instead of waiting for them
        return orders.pin_memory().to(device, non_blocking=True)
    return orders.to(device).contiguous()


def _draw_base_seeds(n_epochs: int, generator: torch.Generator | None) -> None:
    """DataLoader's per-epoch base seed, of which fit needs nothing but the draw: one call for all."""
    torch.empty(n_epochs, dtype=torch.int64).random_(generator=generator)


def _orders_from(generator: torch.Generator, n_rows: int, n_epochs: int) -> torch.Tensor:
    """Per epoch: base seed, randperm, trailing randperm, all from ``generator``."""
    if n_rows <= n_epochs and _bulk_draws_match():
        return torch.from_numpy(_bulk_orders(generator, n_rows, n_epochs))
    orders = torch.empty((n_epochs, n_rows), dtype=torch.int64)
    seed, trailing = torch.empty((), dtype=torch.int64), torch.empty(n_rows, dtype=torch.int64)
    for order in orders.unbind(0):
        seed.random_(generator=generator)
        torch.randperm(n_rows, generator=generator, out=order)
        torch.randperm(n_rows, generator=generator, out=trailing)
    return orders


def _orders_from_global_rng(n_rows: int, n_epochs: int) -> torch.Tensor:
    """Per epoch: the base seed and the sampler's seed from the global RNG (2 int64 an epoch, one
    call for all), then randperm from a generator seeded with the second (one generator, reseeded)."""
    seeds = torch.empty(n_epochs, 2, dtype=torch.int64).random_()[:, 1].tolist()
    orders = torch.empty((n_epochs, n_rows), dtype=torch.int64)
    sampler = torch.Generator()
    for seed, order in zip(seeds, orders.unbind(0)):
        sampler.manual_seed(seed)
        torch.randperm(n_rows, generator=sampler, out=order)
    return orders


# ---------------------------------------------------------------- MT19937 in bulk
def _raw_outputs(generator: torch.Generator, count: int) -> np.ndarray:
    """The next ``count`` (even) 32-bit outputs of a CPU generator (int64; the first is not
    recovered and reads -1), advancing it past them, in three calls.

    An int64 ``random_()`` takes two outputs per element, (high << 32 | low) with the top bit
    cleared: its low word is the second output exactly. Drawn from the generator, that gives the
    odd outputs; drawn from a copy of it one output further on, the even ones from the second on."""
    start = generator.get_state()
    odd = torch.empty(count // 2, dtype=torch.int64).random_(generator=generator)
    shifted = torch.Generator()
    shifted.set_state(start)
    torch.empty((), dtype=torch.int32).random_(generator=shifted)  # an int32 takes one output
    even = torch.empty(count // 2 - 1, dtype=torch.int64).random_(generator=shifted)
    raw = np.empty(count, dtype=np.int64)
    raw[0] = -1
    raw[1::2] = odd.numpy() & 0xFFFFFFFF
    raw[2::2] = even.numpy() & 0xFFFFFFFF
    return raw


def _bulk_orders(generator: torch.Generator, n_rows: int, n_epochs: int) -> np.ndarray:
    """(n_epochs, n_rows): every epoch's (base seed, randperm, trailing randperm) from one run of outputs."""
    swaps = max(n_rows - 1, 0)
    raw = _raw_outputs(generator, n_epochs * (2 + 2 * swaps)).reshape(n_epochs, 2 + 2 * swaps)
    # Output 0-1: the base seed; 2 .. 2+swaps: randperm's draws; the rest: the trailing randperm's.
    targets = np.arange(swaps) + raw[:, 2 : 2 + swaps] % (n_rows - np.arange(swaps))
    # Slot-major storage (slot i of every epoch together): the i-th swap of every epoch is one gather
    # and one scatter (a swap with itself writes one value twice).
    epochs = np.arange(n_epochs)
    here = np.arange(swaps)[:, None] * n_epochs + epochs
    there = targets.T * n_epochs + epochs
    written, read = np.concatenate([here, there], axis=1), np.concatenate([there, here], axis=1)
    slots = np.repeat(np.arange(n_rows, dtype=np.int64), n_epochs)
    for i in range(swaps):  # Fisher-Yates, the i-th swap of every epoch at once
        slots[written[i]] = slots[read[i]]
    return np.ascontiguousarray(slots.reshape(n_rows, n_epochs).T)


@functools.cache
def _bulk_draws_match() -> bool:
    """Whether the bulk draw reproduces PyTorch's own calls on this build (how they use the
    generator is PyTorch's internals): checked once, on fixed seeds."""
    try:
        for seed, n_rows in ((0, 7), (12345, 1), (2**40 + 3, 33)):
            ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            got = _bulk_orders(ours, n_rows, 700 // n_rows + 1)  # crosses a regeneration of the state
            for order in got:
                torch.empty((), dtype=torch.int64).random_(generator=theirs)
                if not np.array_equal(order, torch.randperm(n_rows, generator=theirs).numpy()):
                    return False
                torch.randperm(n_rows, generator=theirs)
            if not torch.equal(ours.get_state(), theirs.get_state()):
                return False
        return True
    except Exception:  # the calls behave otherwise on this build: PyTorch's calls it is
        return False


# ---------------------------------------------------------------- on the device
def device_generator(device: torch.device, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """The generator of shuffle="device": on ``device``, seeded with ``seed``, else with one int64
    of ``generator`` (a device generator is used as it is), else of the global RNG."""
    if generator is not None and generator.device == device and seed is None:
        return generator
    if seed is None:
        seed = int(torch.empty((), dtype=torch.int64).random_(generator=generator))
    return torch.Generator(device).manual_seed(seed)


def device_orders(n_rows: int, n_epochs: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n_epochs, n_rows) int64 permutations drawn on ``device``: per epoch the argsort of random
    63-bit keys (a tie has odds of about N²/2⁶⁴), all epochs in one sort."""
    keys = torch.empty((n_epochs, n_rows), dtype=torch.int64, device=device).random_(generator=generator)
    return torch.argsort(keys, dim=1)
