"""The processes of a `refiners generate` run launched by `torchrun` (which sets RANK, WORLD_SIZE and LOCAL_RANK):
with WORLD_SIZE > 1 each joins torch.distributed's default process group (NCCL on CUDA, Gloo on the CPU), generates
its share of the work and writes only its own outputs; rank 0 shows the progress and the summary."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from refiners_sd15.generate_checks import GenerateError


@dataclass(frozen=True)
class Ranks:
    """This process's `rank` among `world_size` (0 of 1 without torchrun), and its `local_rank` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.world_size > 1:
            dist.barrier()  # pyright: ignore[reportUnknownMemberType]  # torch leaves device_ids untyped

    def gather(self, value: Any) -> list[Any]:
        """`value` of every process (picklable), by rank; `[value]` alone."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)  # pyright: ignore[reportUnknownMemberType]  # untyped in torch
        return gathered

    def leave(self) -> None:
        """Leave the process group `join_ranks` joined."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def join_ranks(device: torch.device) -> Ranks:
    """Join the default process group when torchrun launched WORLD_SIZE > 1 processes (NCCL for a CUDA `device`,
    else Gloo). Raises GenerateError for a WORLD_SIZE > 1 without RANK, or a CUDA run with fewer GPUs than processes on
    a machine."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    if "RANK" not in os.environ:
        raise GenerateError(f"WORLD_SIZE={world_size} but RANK is not set: launch several processes with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise GenerateError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} CUDA devices")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(rank, world_size, local_rank)
