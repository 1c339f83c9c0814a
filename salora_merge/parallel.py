"""Data-parallel runs over processes and nodes (started by ``torchrun`` or ``accelerate launch``): this
process's rank, its share of the prompts, and the sums across processes. A single process (no ``WORLD_SIZE``
above 1) is rank 0 of 1 and every function here is then a no-op."""

from __future__ import annotations

import atexit
import os
from typing import Sequence, TypeVar

import torch

__all__ = ["world_size", "rank", "is_main", "shard", "gather_in_order", "all_reduce_sum_", "barrier"]

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def _ready() -> bool:
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    global _SHUTDOWN_REGISTERED
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if not _SHUTDOWN_REGISTERED:  # ours or the Trainer's (accelerate's) group: a live group at interpreter exit
        atexit.register(_shutdown)  # aborts the process (gloo's threads), so it is destroyed first
        _SHUTDOWN_REGISTERED = True
    return True


_SHUTDOWN_REGISTERED = False


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This process's share: every ``world_size``-th item from its rank (all of them in a single process)."""
    return list(items[rank()::world_size()])


def gather_in_order(local: Sequence[T], total: int) -> list[T]:
    """Every process's share (from :func:`shard`) put back in the original order of ``total`` items."""
    if not _ready():
        return list(local)
    import torch.distributed as dist

    shares: list = [None] * world_size()
    dist.all_gather_object(shares, list(local))
    return [shares[i % world_size()][i // world_size()] for i in range(total)]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the processes in place (on the CPU for gloo); returned for chaining."""
    if not _ready():
        return tensor
    import torch.distributed as dist

    backend = dist.get_backend()
    work = tensor if backend != "gloo" or tensor.device.type == "cpu" else tensor.cpu()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def barrier() -> None:
    if _ready():
        import torch.distributed as dist

        dist.barrier()
