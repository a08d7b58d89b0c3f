"""What the block choices need to know about the device: a CUDA GPU's SM count and shared
memory, or the interpreter. (config.py re-exports these names.)"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceProfile:
    """What the block choice needs to know about the device (shared memory in bytes)."""

    gpu: bool
    multiprocessors: int = 1
    shared_per_block: int = 166912  # the opt-in maximum of one program (an A100's, the smallest of sm_80/sm_90)
    shared_per_sm: int = 167936


INTERPRETER = DeviceProfile(gpu=False)


@functools.lru_cache(maxsize=None)
def device_profile(device: torch.device) -> DeviceProfile:
    """The profile of a torch device: a CUDA GPU, or the interpreter (anything else)."""
    if device.type != "cuda":
        return INTERPRETER
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    per_block = getattr(props, "shared_memory_per_block_optin", DeviceProfile.shared_per_block)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", per_block + 1024)
    return DeviceProfile(gpu=True, multiprocessors=props.multi_processor_count, shared_per_block=per_block,
                         shared_per_sm=per_sm)
