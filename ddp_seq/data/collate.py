"""Per-rank collate: pad only this rank's share of a global batch.

Nothing here is ever scattered across devices: each process builds, pads and (in the model)
packs its own batch, which is what removes DataParallel's PackedSequence problem at the root.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .batching import Step
from .synthetic import SequenceData

#: Target value at padded time steps of per-step (tag) targets; ignored by loss and metrics.
IGNORE_INDEX = -100


@dataclass
class Batch:
    """One rank's padded batch.

    ``lengths`` is a 1-D int64 CPU tensor: ``pack_padded_sequence`` wants its lengths on the CPU
    even when the data is on a GPU. ``weights`` is 1 for real samples and 0 for the filler sample
    of an empty share. ``global_count`` and ``global_tokens`` describe the whole global batch.
    """

    inputs: torch.Tensor  # [B, T, F] float32 or [B, T] int64
    lengths: torch.Tensor  # [B] int64, CPU
    targets: torch.Tensor  # [B] or [B, T] (tag, IGNORE_INDEX past each length)
    mask: torch.Tensor  # [B, T] bool, True at valid steps
    indices: torch.Tensor  # [B] int64, the samples' positions in the dataset
    weights: torch.Tensor  # [B] float32
    global_count: int
    global_tokens: int

    def to(self, device: torch.device) -> Batch:
        """Move the tensors the model computes on; ``lengths`` and ``indices`` stay on the CPU."""
        nb = device.type == "cuda"
        return Batch(self.inputs.to(device, non_blocking=nb), self.lengths,
                     self.targets.to(device, non_blocking=nb), self.mask.to(device, non_blocking=nb),
                     self.indices, self.weights.to(device, non_blocking=nb), self.global_count,
                     self.global_tokens)

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
        start = data.offsets[idx]
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
