"""Sharded evaluation: every rank predicts every W-th batch of a loader; rank 0 gathers them in order.

The batches are the single-process run's own (same loader, same order, same composition), and every batch
uses the same per-sample MC seeds, so the gathered logits equal a one-process evaluation's exactly.
Plain torch.distributed (the process group Lightning's DDP strategy set up, gloo or nccl): no Lightning here.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader


@dataclass(frozen=True)
class Shard:
    """This process's share of an evaluation: batches i with i % world == rank."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """True on the rank that gathers the predictions and writes the results."""
        return self.rank == 0

    def batches(self, loader: Iterable) -> Iterator[tuple[int, Any]]:
        """(index, batch) of this rank's batches; a DataLoader loads only those (its batch sampler is sliced)."""
        if self.world == 1:
            yield from enumerate(loader)
            return
        if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
            ids, index = [], []
            for i, b in enumerate(loader.batch_sampler):
                if i % self.world == self.rank:
                    ids.append(i)
                    index.append(b)
            mine = DataLoader(
                loader.dataset,
                batch_sampler=index,
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                pin_memory=loader.pin_memory,
            )
            yield from zip(ids, mine)
            return
        for i, batch in enumerate(loader):
            if i % self.world == self.rank:
                yield i, batch

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None on the other ranks)."""
        if self.world == 1:
            return [obj]
        everything: list | None = [None] * self.world if self.is_main else None
        dist.gather_object(obj, everything, dst=0)
        return everything

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (so that every rank takes the same branch)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.world > 1:
            dist.barrier()


def current_shard() -> Shard:
    """The running process group's rank and size, or one process."""
    if dist.is_available() and dist.is_initialized():
        return Shard(dist.get_rank(), dist.get_world_size())
    return Shard()


def _destroy_default_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_DESTROY_REGISTERED = False


def destroy_group_at_exit() -> None:
    """Destroy this process's default process group at exit, while the interpreter is still whole.

    Why: Lightning does so only for NCCL. A gloo group left to interpreter finalization can abort the
    process ("terminate called without an active exception", SIGABRT: its worker threads still hold work
    with Python references), which failed a DDP run in CI once in ~10. Idempotent; no-op without a group.
    """
    global _DESTROY_REGISTERED
    if not _DESTROY_REGISTERED and dist.is_available() and dist.is_initialized():
        atexit.register(_destroy_default_group)
        _DESTROY_REGISTERED = True


def cpu_threads_per_rank(local_ranks: int) -> int:
    """Intra-op threads per rank so that the ranks on one machine do not oversubscribe its cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_ranks))
