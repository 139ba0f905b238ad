"""Several training processes through ``torchrun``: one fold per process.

``torchrun --standalone --nproc_per_node N -m pipeline.train --config CONFIG`` starts N copies of the train
stage; process ``rank`` trains folds ``wanted[rank::N]`` (each on ``cuda:<local rank>`` when the device is
CUDA, so N GPUs train N folds at once), writing its folds' files to the run folder as one process would.
After a barrier, rank 0 collects the out-of-fold table and the CV report. A fold's weights depend only on
the config and the fold (every stream is seeded by ``seed + fold``), so the result is the one process's.
Without torchrun (``WORLD_SIZE`` unset or 1) nothing changes. Only rank 0 locks the run folder
(:func:`pipeline.rundir.claim`); the other stages run as usual, in one process.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator, Sequence, TypeVar

import torch

T = TypeVar("T")


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def share(items: Sequence[T]) -> list[T]:
    """This process's share of ``items`` (round robin by rank): all of them in a single process."""
    return list(items)[rank()::world_size()]


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA means this process's own GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and world_size() > 1:
        index = int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """The torch.distributed group for the processes of one torchrun (gloo on CPU, NCCL on CUDA); a no-op in
    a single process. The timeout is a day: a barrier waits for the slowest process's folds."""
    if world_size() <= 1 or torch.distributed.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(days=1))
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def total(value: int) -> int:
    """``value`` summed over the processes of the group (itself in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(tensor)
    return int(tensor.item())


def barrier() -> None:
    """Wait for every process of the group (no-op in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
