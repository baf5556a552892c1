"""Tensor-parallel process group: joining it, and the three collectives the sharded model uses.

One process group per engine (every TP worker is in it), so the helpers work on the default
group. NCCL on CUDA, gloo on a CPU; the rendezvous is a TCP store on 127.0.0.1 that rank 0
serves. Only tensor collectives are used: nothing is ever pickled (no *_object collectives).
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

# How long a collective (and the rendezvous) may wait for a peer. Ranks run in lock step, so
# a wait this long means a peer is stuck; the executor kills the group long before on a death.
_TIMEOUT = timedelta(minutes=10)


def worker_device(device: str, rank: int, world_size: int) -> torch.device:
    """The device of TP rank `rank`: cuda:rank (one GPU each) or the CPU, per config.device."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device.")
    if torch.cuda.device_count() < world_size:
        raise ValueError(
            f"tensor_parallel_size={world_size} needs {world_size} GPUs, "
            f"torch sees {torch.cuda.device_count()}."
        )
    return torch.device("cuda", rank)


def init_tensor_parallel(
    rank: int, world_size: int, init_method: str, device: torch.device
) -> None:
    """Join the engine's process group as `rank` of `world_size` (NCCL on CUDA, else gloo)."""
    assert 0 <= rank < world_size, f"rank {rank} of {world_size}"
    if dist.is_initialized():
        raise RuntimeError("this process is already in a torch.distributed process group.")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=_TIMEOUT,
        **kwargs,
    )


def destroy_tensor_parallel() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def require_group(tp_size: int) -> None:
    """Raise unless this process is in a process group of tp_size ranks."""
    if not dist.is_initialized():
        raise RuntimeError(
            f"tensor_parallel_size={tp_size} needs a torch.distributed process group: "
            "run the model through engine_core.executor.multiproc.MultiprocExecutor."
        )
    if dist.get_world_size() != tp_size:
        raise RuntimeError(
            f"the process group has {dist.get_world_size()} ranks, "
            f"but tensor_parallel_size={tp_size}."
        )


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum t over the ranks, in place; returns t."""
    dist.all_reduce(t)
    return t


def all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (the KV-cache block count all ranks can hold)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def gather_to_first(t: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's t (same shape everywhere), in rank order, on rank 0; None on the others."""
    t = t.contiguous()
    if dist.get_rank() != 0:
        dist.gather(t, None, dst=0)
        return None
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.gather(t, parts, dst=0)
    return parts
