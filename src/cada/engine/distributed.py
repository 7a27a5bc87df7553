"""Which process this is, under ``torchrun``: rank helpers, joining the process group, and sharding batches.

Every process draws the same *global* batch from the one seeded generator (identical on every rank) and takes its
own slice of it: rank r gets items [r * b, (r + 1) * b) of the global batch of b * world items, the equivalent of a
DistributedSampler. The effective batch is therefore the per-process batch x the number of processes, and the
learning rate is *not* scaled with it unless the settings say so (`scale_lr`).
"""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def backend_name() -> str:
    return str(dist.get_backend()) if is_distributed() else "none"


def init_distributed() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR...).

    False (and nothing done) in a plain single process. Backend: gloo for CPU tensors, and NCCL for CUDA
    tensors when CUDA is available (``cpu:gloo,cuda:nccl``; each process then uses GPU LOCAL_RANK).
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed: multi-process training is unavailable")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        if not dist.is_gloo_available():
            raise RuntimeError("multi-process training on CPUs needs the gloo backend, which this PyTorch lacks")
        backend = "gloo"
    dist.init_process_group(backend)
    # Left to interpreter shutdown, gloo's worker threads can abort the process after its work is done
    # ("terminate called without an active exception", pytorch/pytorch#190489): leave the group while Python runs.
    atexit.register(_leave_process_group)
    return True


def _leave_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def shard_of(global_batch: torch.Tensor) -> torch.Tensor:
    """This process's contiguous slice of a global batch (all of it in a single process)."""
    per_rank = len(global_batch) // world_size()
    return global_batch[rank() * per_rank : (rank() + 1) * per_rank]


def batch_shard(n_items: int, batch_size: int) -> list[int]:
    """The items this process handles in sharded inference: whole batches of the single-process split, batch b
    on rank b % world, so every item is computed in exactly the batch it would be in one process."""
    world, me = world_size(), rank()
    return [
        i
        for b, start in enumerate(range(0, n_items, batch_size))
        if b % world == me
        for i in range(start, min(start + batch_size, n_items))
    ]


def lr_factor(settings) -> int:
    """The learning-rate multiplier under `settings`: the process count with `scale_lr`, else 1."""
    return world_size() if getattr(settings, "scale_lr", False) else 1


def describe_distribution(name: str, batch_size: int, optimizer: torch.optim.Optimizer, settings) -> str:
    lrs = ", ".join(f"{group['lr']:g}" for group in optimizer.param_groups)
    world = world_size()
    how = f"scaled x{world} (scale_lr)" if lr_factor(settings) > 1 else "not scaled with the process count"
    return (
        f"{name}: DistributedDataParallel over {world} processes ({backend_name()}); batch {batch_size} per "
        f"process, effective batch {batch_size * world}; lr {lrs} ({how})"
    )
