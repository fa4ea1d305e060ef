"""Multi-process training with PyTorch DistributedDataParallel (``torchrun``).

``torchrun --nproc_per_node=N -m buseg train ...`` starts N processes; each reads the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group (NCCL on
GPUs, gloo on CPU) and trains a replica. Semantics:

* ``--batch-size`` is per process: the global batch is batch_size x N. The learning rate
  is not scaled automatically (scale it yourself if you scale the global batch).
* Each process draws its own random batches (seed + 1000 x rank); gradients are averaged
  across processes by DDP, so every replica holds the same student weights, and each
  process's EMA teacher (updated from identical students) stays identical too.
* BatchNorm statistics are per process (as the reference, which trains on one GPU).
* Only rank 0 validates, writes checkpoints and emits events; the others only train.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .device import resolve_device


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_and_reason(self, spec: str) -> tuple[torch.device, str]:
        device, reason = resolve_device(spec)
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            reason = f"{reason}; rank {self.rank} of {self.world_size} on cuda:{self.local_rank}"
        else:
            reason = f"{reason}; rank {self.rank} of {self.world_size}"
        return device, reason

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        if device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[device.index])
        return DistributedDataParallel(model)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def init_distributed() -> DistributedContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    import torch.distributed as torch_dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and torch_dist.is_nccl_available() else "gloo"
        torch_dist.init_process_group(backend=backend)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, enabled=True)
