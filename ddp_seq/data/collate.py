"""Per-rank collate: pad only this rank's share of a global batch.

Nothing here is ever scattered across devices: each process builds, pads and (in the model)
packs its own batch, which is what removes DataParallel's PackedSequence problem at the root.

The legacy ``training.mode=dp`` is the exception: :func:`collate_dp` prepares the whole global
batch the way the known DataParallel workaround does (see its doc).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .batching import Step
from .sequences import SequenceData

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

    def to(self, device: torch.device) -> Batch:
        """Move the tensors the model computes on; ``lengths`` and ``indices`` stay on the CPU."""
        nb = device.type == "cuda"
        return Batch(self.inputs.to(device, non_blocking=nb), self.lengths,
                     self.targets.to(device, non_blocking=nb), self.mask.to(device, non_blocking=nb),
                     self.indices, self.weights.to(device, non_blocking=nb), self.global_count,
                     self.global_tokens,
                     None if self.scatter_lengths is None else self.scatter_lengths.to(device, non_blocking=nb))

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


def collate(data: SequenceData, step: Step, pad_value: float = 0.0) -> Batch:
    """Pad the sequences of ``step.indices`` to their longest and stack them into a :class:`Batch`."""
    indices = np.asarray(step.indices, dtype=np.int64)
    lengths = data.lengths[indices]
    batch, longest = len(indices), int(lengths.max())
    shape = (batch, longest) + data.values.shape[1:]
    inputs = np.full(shape, pad_value, dtype=data.values.dtype)
    mask = np.zeros((batch, longest), dtype=bool)
    if data.per_step:
        targets = np.full((batch, longest), IGNORE_INDEX, dtype=data.targets.dtype)
    for row, (idx, length) in enumerate(zip(indices, lengths)):
        start = data.starts[idx]
        inputs[row, :length] = data.values[start:start + length]
        mask[row, :length] = True
        if data.per_step:
            targets[row, :length] = data.targets[start:start + length]
    if not data.per_step:
        targets = data.targets[indices]
    weights = np.full(batch, 1.0 if step.real else 0.0, dtype=np.float32)
    return Batch(torch.from_numpy(inputs), torch.from_numpy(lengths.astype(np.int64)),
                 torch.from_numpy(np.ascontiguousarray(targets)), torch.from_numpy(mask),
                 torch.from_numpy(indices), torch.from_numpy(weights), step.global_count, step.global_tokens)


def collate_dp(data: SequenceData, step: Step, pad_value: float = 0.0) -> Batch:
    """``training.mode=dp``: the whole global batch prepared as the known DataParallel workaround does.

    Sorted by length, longest first; the padded tensor ``[B, T, ...]``; the lengths as a 1-D int64
    tensor that travels with the batch to the device (``scatter_lengths``), so that DataParallel's
    scatter splits lengths and inputs along dim 0 alike -- a Python list would be copied whole to
    every replica, and a ``PackedSequence`` would be split field by field into nonsense (README).
    Each replica packs its chunk in ``SeqModel.forward`` and unpacks it to the whole batch's ``T``.

    The sort is what the classic recipe needs for ``enforce_sorted=True``; SeqModel packs with
    ``enforce_sorted=False`` and does not rely on it, so it is kept for fidelity: targets, mask and
    indices are sorted together with the inputs, so nothing has to be unsorted afterwards.
    """
    lengths = data.lengths[np.asarray(step.indices, dtype=np.int64)]
    order = np.argsort(-lengths, kind="stable")
    batch = collate(data, Step(np.asarray(step.indices)[order], step.real, step.global_count, step.global_tokens),
                    pad_value)
    batch.scatter_lengths = batch.lengths.clone()
    return batch


def collate_for(mode: str) -> Callable[..., Batch]:
    """The collate function of ``training.mode``: :func:`collate_dp` for ``dp``, :func:`collate` otherwise."""
    return collate_dp if mode == "dp" else collate
