"""Distributed data parallel helpers (``torchrun``), harmless in a single process.

Launch a training script with ``torchrun --nproc_per_node=N script.py``; torchrun
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``,
and :func:`init_distributed` (called by the trainers) joins the process group with
NCCL on CUDA, gloo on CPU.  Each rank must read a different shard of the data:
build the loader with :func:`build_loader` (a ``DistributedSampler`` whose
``set_epoch`` the trainers call at every epoch, which also makes resumed runs see
the same order).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init_distributed(device: str | None = None) -> torch.device:
    """Join the torchrun process group if ``WORLD_SIZE > 1`` (once); returns this rank's device.

    ``device=None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.
    """
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device(f"cuda:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if ws > 1 and not is_dist():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise RuntimeError(f"WORLD_SIZE={ws} but {missing} unset: launch with torchrun")
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return dev


def init_single_process_group(device: torch.device) -> None:
    """Join a one-process group (NCCL on CUDA, gloo on CPU), for code that needs a process group on a
    single device (FSDP does).  Raises ``RuntimeError`` when a group already exists: under torchrun
    that group is the one to use, so the caller should not have asked."""
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if dist.is_initialized():
        raise RuntimeError("a process group is already initialised (under torchrun, use that one)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def trainer_device(device: str | None, model: torch.nn.Module) -> torch.device:
    """The device a trainer runs on, after joining the process group (:func:`init_distributed`).

    ``device`` when given (``"cuda"`` = ``cuda:LOCAL_RANK``); else the device ``model`` is on.
    A trainer follows the model the caller built and placed, and never moves it silently: a
    CPU program keeps working on a machine that also has a GPU.
    """
    if device is None:
        device = str(module_device(model))
    return init_distributed(device)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in a single process)."""
    if not is_dist():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x / world_size()


def build_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True,
                 num_workers: int = 0, collate_fn: Callable | None = None, **kw: Any) -> DataLoader:
    """A DataLoader over this rank's shard (``DistributedSampler``; one shard when not distributed).

    The order is a function of ``(seed, epoch)`` only -- the trainers call
    ``loader.sampler.set_epoch(epoch)`` -- so an interrupted run resumes on exactly
    the batches it would have seen.  ``batch_size`` is per rank.

    The loader has its own generator (seeded with ``seed``): a DataLoader without one draws its
    base seed from the global random stream at every ``iter()``, which would shift the dropout
    stream of a run resumed between epochs or after an evaluation loop.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=shuffle, seed=seed,
                                 drop_last=drop_last)
    generator = kw.pop("generator", None) or torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      collate_fn=collate_fn, generator=generator, **kw)
