"""GPU check section: PyTorch integration (bench/torch_integration_check.py): every registered op
under torch.library.opcheck on the device; model.train_step with FusedSGD under
torch.compile(fullgraph=True) against eager (the recheck of FusedSGD's scheduler flag, which
Dynamo could not trace as a setattr on torch 2.11); the step captured in a CUDA graph; a one-rank
NCCL process group through the data-parallel step. A child process of the parallel phase: its
"ms" figures were taken beside other processes and are not performance figures."""

from __future__ import annotations

from check_ctx import Ctx, run_checks
from torch_integration_check import torch_integration_checks

SECTION = "torch"
ORDER = 30
BUDGET_S = 60.0  # the compiled step's cold Inductor compile is most of it


def run(ctx: Ctx) -> None:
    run_checks(ctx, torch_integration_checks(ctx.device, smoke=ctx.smoke))
