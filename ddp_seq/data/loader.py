"""A standard ``torch.utils.data.DataLoader`` over the sampler's shares, set up as the trainer uses it."""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from ddp_seq.data.collate import Batch, ShareDataset, collate
from ddp_seq.data.sampler import BucketBatchSampler


def build_loader(dataset, batch_sampler: BucketBatchSampler, collate_fn: Callable[[list], Batch] = collate, *,
                 num_workers: int = 0, pin_memory: bool | None = None, persistent_workers: bool = True,
                 prefetch_factor: int = 2) -> DataLoader:
    """``DataLoader(ShareDataset(dataset), batch_sampler=batch_sampler, collate_fn=collate_fn, ...)``.

    The batches are the same with any ``num_workers``: the sampler runs in this process and the
    loader returns batches in the sampler's order. With workers, ``collate_fn`` runs in them.

    Args:
        dataset: items ``(sequence, target)``, see :func:`~ddp_seq.data.collate.collate`.
        batch_sampler: this rank's sampler (``set_epoch`` it before iterating, as usual).
        collate_fn: turns a share's items into a :class:`~ddp_seq.data.collate.Batch`.
        num_workers: worker processes (0 = collate in this process).
        pin_memory: page-locked batches for asynchronous copies to a GPU; None = when CUDA is available.
        persistent_workers: keep workers between epochs (``num_workers > 0`` only).
        prefetch_factor: batches each worker prepares ahead (``num_workers > 0`` only).
    """
    workers = num_workers > 0
    # worker_init_fn: stop signals are the training process's to handle (it stops every rank at one
    # step and checkpoints); a worker killed by Ctrl-C or SIGTERM first would only fail that.
    # Its own generator: each iter() of a DataLoader draws a base seed (for worker seeds) from the
    # generator it is given, else from torch's global RNG -- which would move the dropout masks of
    # the training that follows, and a resumed run (one more iter()) would not match the original.
    return DataLoader(ShareDataset(dataset), batch_sampler=batch_sampler, collate_fn=collate_fn,
                      num_workers=num_workers, generator=torch.Generator().manual_seed(0),
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      persistent_workers=persistent_workers and workers,
                      prefetch_factor=prefetch_factor if workers else None,
                      worker_init_fn=ignore_stop_signals if workers else None)


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn``: a DataLoader worker ignores SIGINT and SIGTERM, which reach it with its
    training process (a terminal's Ctrl-C goes to the whole process group; ``kill`` of a process
    group too); the training process stops at a common step and shuts its workers down itself.
    A worker still exits when its training process dies (torch's worker watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
