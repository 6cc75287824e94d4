"""Where the train and val sequences come from (synthetic or npz files), and the model's output width.

Everything here is deterministic from the config, so every rank builds the same splits on its own.
"""

from __future__ import annotations

import numpy as np

from ..config import DataConfig, UserError
from . import synthetic
from .files import load_npz
from .synthetic import SequenceData, make_synthetic


def subset(data: SequenceData, indices: np.ndarray) -> SequenceData:
    """The sequences ``indices`` (in that order) as a new, compact :class:`SequenceData`.

    Vectorised: one gather over a step index built with repeat/cumsum, no per-sample Python work.
    """
    indices = np.asarray(indices, dtype=np.int64)
    lengths = data.lengths[indices]
    offsets = np.zeros(len(indices) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Step k of output sample j is source step starts[j] + (k - offsets[j]): repeat the per-sample shift.
    shift = data.offsets[indices] - offsets[:-1]
    steps = np.repeat(shift, lengths) + np.arange(offsets[-1], dtype=np.int64)
    targets = data.targets[steps] if data.per_step else data.targets[indices]
    return SequenceData(data.values[steps], offsets, targets, data.per_step)


def holdout_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) sample indices: ``max(1, round(fraction * n))`` random samples held out for val.

    Fixed by ``seed``; both index arrays are sorted, so each split keeps the file's order.
    """
    n_val = min(n - 1, max(1, round(fraction * n)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def load_splits(cfg: DataConfig) -> tuple[SequenceData, SequenceData]:
    """The (train, val) data of the config: synthetic, or npz files (val from ``val_path`` or held out)."""
    if cfg.format == "synthetic":
        return make_synthetic(cfg, "train"), make_synthetic(cfg, "val")
    train = load_npz(cfg.train_path, cfg.task)
    if cfg.val_path:
        return train, load_npz(cfg.val_path, cfg.task)
    if len(train) < 2:
        raise UserError(f"{cfg.train_path}: {len(train)} sample cannot be split into train and validation "
                        "(data.val_fraction); add samples or set data.val_path")
    train_idx, val_idx = holdout_indices(len(train), cfg.val_fraction, cfg.seed)
    return subset(train, train_idx), subset(train, val_idx)


def num_outputs(cfg: DataConfig, train: SequenceData, val: SequenceData | None = None) -> int:
    """Width of the model's head: classes (classify, tag) or 1 (regress).

    For npz data the classes are ``0..max training label`` (at least 2). A validation label beyond them
    is a UserError: the model could never predict it, and the loss would index out of range.
    """
    if cfg.format == "synthetic":
        return synthetic.num_outputs(cfg)
    if cfg.task == "regress":
        return 1
    classes = max(2, int(train.targets.max(initial=0)) + 1)
    if val is not None and len(val.targets) and int(val.targets.max()) >= classes:
        kind = "tag" if cfg.task == "tag" else "label"
        source = cfg.val_path or f"{cfg.train_path} (held-out validation split, data.val_fraction)"
        raise UserError(f"{source}: {kind} {int(val.targets.max())} in the validation data does not occur in "
                        f"training (classes 0..{classes - 1})")
    return classes
