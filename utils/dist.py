"""Distributed helpers: one process per device under torchrun (NCCL on GPUs, gloo on CPU).

Every rank runs the same script with the same seed, so sampled search paths and shuffles
agree; each rank takes its share of every global batch; gradients are summed across ranks
(our losses are sums over the batch, so N processes with a global batch B step exactly like
one process with batch B); rank 0 alone writes logs and checkpoints.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env() -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def sum_grads(tensors: list[torch.Tensor]) -> None:
    """Sum gradients across ranks in one flat buffer (one collective, not one per tensor).

    Every rank passes the same tensors in the same order: the weight step samples the same
    path on every rank, so the same candidates have gradients everywhere.
    """
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_per_rank(items: list) -> list[list]:
    """Every rank's list, one per rank, in rank order (on every rank)."""
    if not active():
        return [items]
    out = [None] * world()
    dist.all_gather_object(out, items)
    return out


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
