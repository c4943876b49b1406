"""Data parallelism with torch.distributed, as launched by `torchrun` (which sets RANK, WORLD_SIZE, LOCAL_RANK...).

With WORLD_SIZE > 1 every process joins the default process group (NCCL on CUDA, Gloo on the CPU); the trainer wraps
the trainable part of the model in `DistributedDataParallel`, so gradients are averaged across processes, and gives
each process its share of every global batch. Rank 0 alone writes checkpoints, exports, samples and logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: `rank` of `world_size` (0 of 1 without torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for in a single process)."""
        if self.enabled:
            dist.barrier()  # pyright: ignore[reportUnknownMemberType]  # torch leaves device_ids untyped

    def mean(self, value: float, device: torch.device) -> float:
        """The average of `value` over the processes."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)  # pyright: ignore[reportUnknownMemberType]  # torch leaves tensor, group untyped
        return float(tensor.item()) / self.world_size


def start_processes(device: torch.device) -> Processes:
    """Join the process group if launched by torchrun with WORLD_SIZE > 1 (NCCL for CUDA, else Gloo).

    Raises RuntimeError for a WORLD_SIZE > 1 without the RANK torchrun sets.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world_size} but RANK is not set: launch multi-process training with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Processes(rank=rank, world_size=world_size, local_rank=local_rank)


def stop_processes(processes: Processes) -> None:
    """Leave the process group joined by `start_processes`."""
    if processes.enabled and dist.is_initialized():
        dist.destroy_process_group()
