"""Multi-process training with PyTorch DistributedDataParallel (``torchrun``).

``torchrun --nproc_per_node=N -m buseg train ...`` starts N processes; each reads the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK), joins the process group (NCCL
when the training device is a CUDA GPU, gloo on the CPU) and trains a replica. Semantics
(docs/worker-protocol.md, "Multi-GPU"):

* ``--batch-size`` is per process: the global batch is batch_size x N. The learning rate
  is not scaled automatically (scale it yourself if you scale the global batch).
* Every process starts from rank 0's initial weights (DDP broadcasts them; the EMA
  teacher is copied from the broadcast student). Each process draws its own random
  batches (generator seeded with seed + 1000 x rank); DDP averages the gradients, so every
  replica holds the same student weights and, updated from identical students, the same
  EMA teacher (its BatchNorm statistics are rank 0's, copied every iteration).
* BatchNorm normalises with each process's own batch statistics (no SyncBatchNorm, as
  the reference trains on one GPU); DDP copies rank 0's running statistics to the others.
* Only rank 0 validates, writes files and emits events; the others train and keep quiet.
  Losses in progress events are averaged over all processes.
* A cancel (SIGTERM/SIGINT, forwarded by torchrun) is agreed on by all processes at the
  end of an iteration, so they stop at the same iteration and ``last.pt`` holds every
  rank's random state: ``--resume`` with the same N continues exactly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from buseg.device import resolve_device
from buseg.errors import ConfigError

# Rank 0 validates while the others wait in the next collective: allow long validations.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)


def process_rank() -> int:
    """This process's rank as torchrun announces it (0 outside torchrun), before any init."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_and_reason(self, spec: str) -> tuple[torch.device, str]:
        device, reason = resolve_device(spec)
        if not self.enabled:
            return device, reason
        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"process with local rank {self.local_rank} has no GPU: only {torch.cuda.device_count()} "
                    "CUDA device(s) visible",
                    hint="use --nproc_per_node at most the number of GPUs",
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
            reason = f"{reason}; rank {self.rank} of {self.world_size} on cuda:{self.local_rank}"
        elif device.type == "mps":
            raise ConfigError("multi-process training is not supported on Apple MPS", hint="use --device cpu")
        else:
            reason = f"{reason}; rank {self.rank} of {self.world_size}"
        return device, reason

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        if device.type == "cuda":
            return DistributedDataParallel(model, device_ids=[device.index])
        return DistributedDataParallel(model)

    # Collectives: every rank must call them at the same point of the loop.

    def _tensor(self, values: list[float]) -> torch.Tensor:
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        return torch.tensor(
            values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device
        )

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        if not self.enabled:
            return flag
        value = self._tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item() > 0)

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each value (the keys must be the same on every rank)."""
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        tensor = self._tensor([float(values[k]) for k in keys])
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return {k: float(v) / self.world_size for k, v in zip(keys, tensor.tolist(), strict=True)}

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order (on every rank)."""
        if not self.enabled:
            return [obj]
        result: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(result, obj)
        return result

    def sync_buffers(self, module: nn.Module) -> None:
        """Copy rank 0's floating-point buffers (BatchNorm statistics) into ``module`` on every rank.

        Used for the EMA teacher: its weights follow identical students, but its BatchNorm
        statistics would follow each rank's own batches and drift apart (then a resumed
        run, whose ranks all load rank 0's teacher, would not continue exactly).
        """
        if not self.enabled:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for buffer in module.buffers():
            if buffer.dtype.is_floating_point:
                by_dtype.setdefault(buffer.dtype, []).append(buffer)
        for buffers in by_dtype.values():  # one broadcast per dtype, not one per buffer
            flat = torch.cat([b.detach().reshape(-1) for b in buffers])
            torch.distributed.broadcast(flat, src=0)
            offset = 0
            with torch.no_grad():
                for b in buffers:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def shutdown(self) -> None:
        """Leave the process group if this context created it."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False


def init_distributed(device_spec: str = "auto") -> DistributedContext:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); else a single process.

    The backend follows the training device: NCCL when ``device_spec`` resolves to a CUDA
    GPU, gloo otherwise (CPU; also the only choice on Windows and macOS).
    """
    if not under_torchrun():
        return DistributedContext()
    import torch.distributed as torch_dist

    world_size = int(os.environ["WORLD_SIZE"])
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if torch_dist.is_initialized():
        backend = torch_dist.get_backend()
    else:
        device, _ = resolve_device(device_spec)
        backend = "nccl" if device.type == "cuda" and torch_dist.is_nccl_available() else "gloo"
        if backend == "nccl" and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)  # NCCL binds each process to its own GPU
        torch_dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
        owns = True
    return DistributedContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        enabled=True,
        backend=str(backend),
        owns_group=owns,
    )
