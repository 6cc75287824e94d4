"""Per-rank collate: pad only this rank's share of a global batch.

Nothing here is ever scattered across devices: each process builds, pads and (in the model)
packs its own batch, which is what removes DataParallel's PackedSequence problem at the root.

Items are ``(sequence, target)`` pairs, as a user's ``Dataset.__getitem__`` returns them;
:class:`ShareDataset` lets the sampler's share (and with it the global batch's counts, which the
loss divides by) reach :func:`collate` through a standard ``DataLoader``, in worker processes too.

The legacy ``training.mode=dp`` is the exception: :func:`collate_dp` prepares the whole global
batch the way the known DataParallel workaround does (see its doc).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from ddp_seq.data.sampler import Share

#: Target value at padded time steps of per-step (tag) targets; ignored by loss and metrics.
IGNORE_INDEX = -100


@dataclass
class Batch:
    """One rank's padded batch.

    ``lengths`` is a 1-D int64 CPU tensor: ``pack_padded_sequence`` wants its lengths on the CPU
    even when the data is on a GPU. ``weights`` is 1 for real samples and 0 for the filler sample
    of an empty share. ``global_count`` and ``global_tokens`` describe the whole global batch.
    ``scatter_lengths`` is set by :func:`collate_dp` only: a copy of ``lengths`` that moves to the
    device with ``inputs`` (``lengths`` itself stays on the CPU for the token counters, which must
    not wait for the device).
    """

    inputs: torch.Tensor  # [B, T, F] float32 or [B, T] int64
    lengths: torch.Tensor  # [B] int64, CPU
    targets: torch.Tensor  # [B] or [B, T] (tag, IGNORE_INDEX past each length)
    mask: torch.Tensor  # [B, T] bool, True at valid steps
    indices: torch.Tensor  # [B] int64, the samples' positions in the dataset
    weights: torch.Tensor  # [B] float32
    global_count: int
    global_tokens: int
    scatter_lengths: torch.Tensor | None = None  # [B] int64, travels with inputs (dp mode); None otherwise
    position: int = -1  # the global batch's index in its epoch's plan; -1 when not from a sampler

    def _map(self, move) -> Batch:
        """A copy with ``move`` applied to the tensors the model computes on (not lengths, indices)."""
        return Batch(move(self.inputs), self.lengths, move(self.targets), move(self.mask), self.indices,
                     move(self.weights), self.global_count, self.global_tokens,
                     None if self.scatter_lengths is None else move(self.scatter_lengths), self.position)

    def pin_memory(self) -> Batch:
        """Page-locked copies, so :meth:`to` can copy to a GPU asynchronously (DataLoader's
        ``pin_memory=True`` calls this in its pinning thread)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device) -> Batch:
        """Move the tensors the model computes on; ``lengths`` and ``indices`` stay on the CPU.

        The copy is asynchronous (``non_blocking``) only from pinned memory: from pageable memory
        CUDA copies synchronously anyway, through a staging buffer.
        """
        nb = device.type == "cuda" and self.inputs.is_pinned()
        return self._map(lambda t: t.to(device, non_blocking=nb))

    @property
    def model_lengths(self) -> torch.Tensor:
        """The lengths the model is called with: ``scatter_lengths`` in dp mode, else ``lengths``."""
        return self.lengths if self.scatter_lengths is None else self.scatter_lengths

    @property
    def real_tokens(self) -> int:
        return int((self.lengths * (self.weights > 0)).sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.inputs.shape[0] * self.inputs.shape[1])


class ShareItems(list):
    """The dataset items of one :class:`~ddp_seq.data.sampler.Share`, in its order, with the share
    itself (``share``): what :func:`collate` needs to fill in the global counts."""

    def __init__(self, items, share: Share) -> None:
        super().__init__(items)
        self.share = share


def fetch(dataset, share: Share) -> ShareItems:
    """The items of ``share`` from ``dataset`` (through its ``__getitems__`` when it has one)."""
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(share)) if getitems is not None else [dataset[i] for i in share]
    return ShareItems(items, share)


class ShareDataset(Dataset):
    """``dataset`` as a DataLoader sees it, plus one thing: a batch fetched for a
    :class:`~ddp_seq.data.sampler.Share` keeps the share (through torch's batched-fetch hook
    ``__getitems__``), so :func:`collate` knows the global batch's counts -- a plain DataLoader
    hands ``collate_fn`` the items only. Use it as
    ``DataLoader(ShareDataset(dataset), batch_sampler=BucketBatchSampler(...), collate_fn=collate)``.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return self.dataset[index]

    def __getitems__(self, indices: list[int]) -> list:
        if isinstance(indices, Share):
            return fetch(self.dataset, indices)
        return [self.dataset[i] for i in indices]


def _as_array(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def collate(items: list, pad_value: float = 0.0, pad_to_multiple_of: int = 1) -> Batch:
    """Pad a list of ``(sequence, target)`` items into one :class:`Batch`, without sorting them.

    Args:
        items: each ``sequence`` is a tensor or ndarray ``[T, F]`` of floats (stored as float32) or
            ``[T]`` of token ids (int64), ``T >= 1``; each ``target`` an int (class), a float
            (value) or a per-step ``[T]`` array (int tags, or floats). A :class:`ShareItems` (from
            :class:`ShareDataset` or :func:`fetch`) also gives the global batch's counts, whether
            the share is a filler (weights 0), its position, and the samples' dataset indices; a
            plain list is taken as the whole global batch, which only one process can know.
        pad_value: the value of padded input steps.
        pad_to_multiple_of: pad the time dimension up to a multiple of this (1: to the longest
            sequence exactly), as Hugging Face's ``pad_to_multiple_of``; pass it with
            ``functools.partial(collate, pad_to_multiple_of=k)``. Fewer distinct ``(B, T)`` shapes
            mean fewer oneDNN primitives cached on CPU (the trainer bounds the cache instead:
            docs/batching.md "Memory"). The extra steps follow every sequence's end: outputs and
            losses are unchanged; gradients may differ in the last float32 bits.

    Returns:
        A :class:`Batch`: ``inputs`` ``[B, T, F]`` float32 or ``[B, T]`` int64, ``lengths``
        ``[B]`` int64 on the CPU, ``targets`` ``[B]`` or ``[B, T]`` (``IGNORE_INDEX``, or 0.0
        for float targets, past each length), ``mask`` ``[B, T]``; ``T`` is the longest length
        rounded up to a multiple of ``pad_to_multiple_of``.

    Raises:
        ValueError: an empty batch or sequence, mixed sequence kinds, a per-step target whose
            length differs from its sequence's (naming the item), ``pad_to_multiple_of < 1``, or a
            plain list on a job of several ranks (``WORLD_SIZE`` > 1 or a process group of more than
            one): without its Share the global count is unknown -- use :class:`ShareDataset`.
    """
    if len(items) == 0:
        raise ValueError("collate: no items")
    if int(pad_to_multiple_of) != pad_to_multiple_of or pad_to_multiple_of < 1:
        raise ValueError(f"collate: pad_to_multiple_of should be an integer >= 1, got {pad_to_multiple_of!r}")
    share = getattr(items, "share", None)
    if share is None:
        _refuse_without_share(len(items))
    sequences = [_as_array(item[0]) for item in items]
    first = sequences[0]
    if first.ndim not in (1, 2):
        raise ValueError(f"collate: a sequence should be [T] token ids or [T, F] features, got shape {first.shape}")
    lengths = np.array([len(seq) for seq in sequences], dtype=np.int64)
    if lengths.min() < 1:
        raise ValueError(f"collate: item {int(np.argmin(lengths))} has no steps (pack_padded_sequence rejects it)")
    dtype = np.int64 if first.ndim == 1 and np.issubdtype(first.dtype, np.integer) else np.float32
    multiple = int(pad_to_multiple_of)  # T: the longest length, rounded up to the multiple
    batch, steps = len(items), -(-int(lengths.max()) // multiple) * multiple
    inputs = np.full((batch, steps) + first.shape[1:], pad_value, dtype=dtype)
    for row, seq in enumerate(sequences):
        if seq.shape[1:] != first.shape[1:]:
            raise ValueError(f"collate: item {row} has steps of shape {seq.shape[1:]}, item 0 {first.shape[1:]}")
        inputs[row, :len(seq)] = seq
    mask = np.arange(steps)[None, :] < lengths[:, None]
    targets = _pad_targets([_as_array(item[1]) for item in items], lengths, steps)
    real = share.real if share is not None else True
    weights = np.full(batch, 1.0 if real else 0.0, dtype=np.float32)
    indices = share.indices if share is not None else np.arange(batch, dtype=np.int64)
    global_count = share.global_count if share is not None else batch
    global_tokens = share.global_tokens if share is not None else int(lengths.sum())
    return Batch(torch.from_numpy(inputs), torch.from_numpy(lengths), torch.from_numpy(targets),
                 torch.from_numpy(mask), torch.from_numpy(indices), torch.from_numpy(weights), global_count,
                 global_tokens, position=share.position if share is not None else -1)


def _job_world_size() -> int:
    """The ranks of this job: the process group's, else torchrun's ``WORLD_SIZE`` (which DataLoader
    worker processes inherit even where they hold no process group), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def _refuse_without_share(count: int) -> None:
    """Items without their :class:`~ddp_seq.data.sampler.Share` are one process's whole global batch;
    on a job of several ranks they are one rank's share, whose global count is unknown here -- and a
    loss divided by the share's own count would make every gradient ``world_size`` times too large."""
    world_size = _job_world_size()
    if world_size > 1:
        raise ValueError(f"collate: {count} items came without their Share on a job of {world_size} ranks, so the "
                         "global batch's count is unknown (the loss would be divided by this rank's count); wrap the "
                         "dataset: DataLoader(ShareDataset(dataset), batch_sampler=..., collate_fn=collate), or use "
                         "ddp_seq.build_loader")


def _pad_targets(targets: list[np.ndarray], lengths: np.ndarray, longest: int) -> np.ndarray:
    """``[B]`` per-sequence targets, or ``[B, longest]`` per-step ones padded past each length."""
    first = targets[0]
    integer = np.issubdtype(first.dtype, np.integer) or first.dtype == bool
    dtype = np.int64 if integer else np.float32
    if first.ndim == 0:
        return np.array([t.item() for t in targets], dtype=dtype)
    out = np.full((len(targets), longest), IGNORE_INDEX if integer else 0.0, dtype=dtype)
    for row, (target, length) in enumerate(zip(targets, lengths)):
        if target.shape != (length,):
            raise ValueError(f"collate: item {row} has a per-step target of shape {target.shape} for a sequence "
                             f"of {length} steps")
        out[row, :length] = target
    return out


def collate_dp(items: list, pad_value: float = 0.0, pad_to_multiple_of: int = 1) -> Batch:
    """``training.mode=dp``: the whole global batch prepared as the known DataParallel workaround does.

    Sorted by length, longest first; the padded tensor ``[B, T, ...]``; the lengths as a 1-D int64
    tensor that travels with the batch to the device (``scatter_lengths``), so that DataParallel's
    scatter splits lengths and inputs along dim 0 alike -- a Python list would be copied whole to
    every replica, and a ``PackedSequence`` would be split field by field into nonsense
    (docs/modes-and-parity.md). Each replica packs its chunk in ``SeqModel.forward`` and unpacks it
    to the whole batch's ``T``.

    The sort is what the classic recipe needs for ``enforce_sorted=True``; SeqModel packs with
    ``enforce_sorted=False`` and does not rely on it, so it is kept for fidelity: targets, mask and
    indices are sorted together with the inputs, so nothing has to be unsorted afterwards.
    """
    order = np.argsort([-len(_as_array(item[0])) for item in items], kind="stable")
    share = getattr(items, "share", None)
    ordered = [items[i] for i in order]
    if share is not None:
        ordered = ShareItems(ordered, Share(share.indices[order], share.real, share.global_count, share.global_tokens,
                                            share.epoch, share.position))
    batch = collate(ordered, pad_value, pad_to_multiple_of)
    batch.scatter_lengths = batch.lengths.clone()
    return batch


def collate_for(mode: str) -> Callable[..., Batch]:
    """The collate function of ``training.mode``: :func:`collate_dp` for ``dp``, :func:`collate` otherwise."""
    return collate_dp if mode == "dp" else collate
