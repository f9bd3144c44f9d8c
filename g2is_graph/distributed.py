"""Runs launched by torchrun or `accelerate launch`: one process per rank, told apart by RANK/WORLD_SIZE.

Both launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process, so the
jobs read them here rather than asking for a hand-made --shard. The gradient job splits its chunks by rank
and only needs a barrier at the end; the warmup sums each optimizer step's LoRA gradient over the ranks.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from g2is_graph.config import RANK_WAIT_HOURS
from g2is_graph.errors import ConfigError


@dataclass(frozen=True)
class Ranks:
    """This process's place in a launched job (rank 0 of 1 when started directly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(environ=os.environ) -> Ranks:
    """The launcher's RANK/WORLD_SIZE/LOCAL_RANK; a single process when WORLD_SIZE is unset or 1."""
    if "WORLD_SIZE" not in environ:
        return Ranks()
    try:
        world = int(environ["WORLD_SIZE"])
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun or accelerate): {exc}") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}: need 0 <= RANK < WORLD_SIZE")
    return Ranks(rank, world, local)


def rank_device(ranks: Ranks, device: str) -> str:
    """`auto`/`cuda` mean this rank's own GPU (cuda:LOCAL_RANK) under a launcher; anything else is kept."""
    from g2is_graph.model.loading import pick_device

    resolved = pick_device(device)
    if ranks.distributed and resolved == "cuda":
        return f"cuda:{ranks.local_rank}"
    return resolved


@contextmanager
def process_group(ranks: Ranks, device: str):
    """torch.distributed for the launched job (NCCL between GPUs, gloo otherwise); nothing when not launched."""
    import torch.distributed as dist

    if not ranks.distributed or dist.is_initialized():
        yield
        return
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={ranks.world_size} but {', '.join(missing)} unset: start the job with torchrun "
                          "or accelerate launch")
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=ranks.rank,
                            world_size=ranks.world_size, timeout=timedelta(hours=RANK_WAIT_HOURS))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_reduce_sum(ranks: Ranks, tensor) -> None:
    """In place: the sum of `tensor` over all ranks."""
    if ranks.distributed:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
