"""The embedded synthetic tasks (deterministic from the seed), stored as :class:`SequenceData`."""

from __future__ import annotations

import numpy as np

from ddp_seq.config import DataConfig
from ddp_seq.data.readers.sequences import SequenceData

__all__ = ["SequenceData", "make_synthetic", "num_outputs", "sample_lengths", "split_lengths"]


def sample_lengths(cfg: DataConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Skewed lengths: lognormal with the configured median and sigma, clipped to [min_length, max_length]
    (``max_length`` 0: no upper bound)."""
    raw = rng.lognormal(mean=np.log(cfg.length_median), sigma=cfg.length_sigma, size=n)
    return np.clip(np.rint(raw), cfg.min_length, cfg.max_length or None).astype(np.int64)


def _classify(cfg: DataConfig, lengths: np.ndarray, rng: np.random.Generator):
    """Majority vote over markers spread across the whole sequence.

    Channel ``c < num_classes`` fires (value 1) at scattered steps for "votes" of class ``c``.
    The label class gets ``k`` votes and one other class ``k - 1``, so the answer depends on
    counting markers anywhere in the sequence: a model that truncates, or that lets padding wash
    out its state, loses votes and with them the label.
    """
    n, total = len(lengths), int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = (rng.standard_normal((total, cfg.features)) * cfg.noise).astype(np.float32)
    labels = rng.integers(0, cfg.num_classes, size=n)
    for i in range(n):
        length, start = int(lengths[i]), int(offsets[i])
        most = min(3, (length + 1) // 2)  # label votes k, rival k-1: 2k-1 <= length steps
        k = int(rng.integers(1, most + 1))
        rival = (labels[i] + rng.integers(1, cfg.num_classes)) % cfg.num_classes
        steps = rng.choice(length, size=2 * k - 1, replace=False) + start
        values[steps[:k], labels[i]] += 1.0
        values[steps[k:], rival] += 1.0
    return values, offsets, labels.astype(np.int64), False


def _regress(cfg: DataConfig, lengths: np.ndarray, rng: np.random.Generator):
    """The adding problem: channel 0 holds values in [0, 1), channel 1 marks two steps (one in each
    half of the sequence); the target is the sum of the two marked values."""
    n, total = len(lengths), int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = (rng.standard_normal((total, cfg.features)) * cfg.noise).astype(np.float32)
    values[:, 0] = rng.random(total)
    values[:, 1] = 0.0
    targets = np.empty(n, dtype=np.float32)
    for i in range(n):
        length, start = int(lengths[i]), int(offsets[i])
        half = max(1, length // 2)
        marks = {start + int(rng.integers(0, half)), start + half + int(rng.integers(0, length - half))} \
            if length >= 2 else {start}
        marked = np.fromiter(marks, dtype=np.int64)
        values[marked, 1] = 1.0
        targets[i] = values[marked, 0].sum()
    return values, offsets, targets, False


def _tag(cfg: DataConfig, lengths: np.ndarray, rng: np.random.Generator):
    """Running parity: channel 0 is a random bit; the tag at step t is the parity of bits 0..t."""
    total = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = (rng.standard_normal((total, cfg.features)) * cfg.noise).astype(np.float32)
    bits = rng.integers(0, 2, size=total)
    values[:, 0] += bits
    tags = np.empty(total, dtype=np.int64)
    for start, end in zip(offsets[:-1], offsets[1:]):
        tags[start:end] = np.cumsum(bits[start:end]) % 2
    return values, offsets, tags, True


_TASKS = {"classify": _classify, "regress": _regress, "tag": _tag}


def _split_stream(cfg: DataConfig, split: str) -> tuple[int, np.random.Generator]:
    """The size of ``split`` and its random stream, whose first draw is the lengths."""
    n = cfg.num_train if split == "train" else cfg.num_val
    # Distinct, fixed streams per split so the val set does not change with num_train.
    return n, np.random.default_rng([cfg.seed, {"train": 0, "val": 1}[split]])


def split_lengths(cfg: DataConfig, split: str) -> np.ndarray:
    """``make_synthetic(cfg, split).lengths`` ``[n]`` int64 without generating the steps (8 bytes per
    sequence instead of ``4 x features`` per step): what ``ddp-seq plan`` needs."""
    n, rng = _split_stream(cfg, split)
    return sample_lengths(cfg, n, rng)


def make_synthetic(cfg: DataConfig, split: str) -> SequenceData:
    """The ``train`` or ``val`` split of the configured task; identical on every rank."""
    n, rng = _split_stream(cfg, split)
    lengths = sample_lengths(cfg, n, rng)
    values, offsets, targets, per_step = _TASKS[cfg.task](cfg, lengths, rng)
    return SequenceData(values, offsets.astype(np.int64), targets, per_step, source=f"synthetic {split} data")


def num_outputs(cfg: DataConfig) -> int:
    """Width of the model's head for the task."""
    return {"classify": cfg.num_classes, "regress": 1, "tag": 2}[cfg.task]
