"""ddp_seq: train LSTM/GRU models on variable-length sequences with torchrun + DDP.

Each rank pads and packs only its own share of every global batch, so nothing is ever
scattered across devices (the root of DataParallel's PackedSequence problem).

The library, usable without the config or the CLI::

    from torch.utils.data import DataLoader
    from ddp_seq import BucketBatchSampler, ShareDataset, collate, PackedLSTM, Trainer

- :class:`BucketBatchSampler`: a batch sampler for ``DataLoader`` that gives every rank its share
  of the same global batches (equal steps per rank, batches from (seed, epoch) only), resumable.
- :func:`collate` with :class:`ShareDataset` (or :func:`build_loader`): pads ``(sequence, target)``
  items into a :class:`Batch` that knows the global batch's count, which the loss divides by.
- :class:`PackedLSTM` / :class:`PackedGRU`: ``nn.LSTM`` / ``nn.GRU`` that take ``(padded, lengths)``.
- :class:`Trainer`: DDP training of your model on your datasets with your objective, resumable
  at any step, under any world size; :func:`cross_validate`: k-fold of any dataset with it.

Names are imported on first use, so ``python -m ddp_seq check-config`` never loads torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "BucketBatchSampler": "ddp_seq.data.sampler",
    "Share": "ddp_seq.data.sampler",
    "Batch": "ddp_seq.data.collate",
    "IGNORE_INDEX": "ddp_seq.data.collate",
    "ShareDataset": "ddp_seq.data.collate",
    "collate": "ddp_seq.data.collate",
    "collate_dp": "ddp_seq.data.collate",
    "build_loader": "ddp_seq.data.loader",
    "PackedLSTM": "ddp_seq.nn.rnn",
    "PackedGRU": "ddp_seq.nn.rnn",
    "SeqModel": "ddp_seq.nn.seq_model",
    "Objective": "ddp_seq.train.objective",
    "TaskObjective": "ddp_seq.train.objective",
    "LossFunction": "ddp_seq.train.objective",
    "Trainer": "ddp_seq.train.trainer",
    "cross_validate": "ddp_seq.train.cross_validation",
    "evaluate": "ddp_seq.train.evaluation",
    "Config": "ddp_seq.config",
    "load_config": "ddp_seq.config",
    "DistInfo": "ddp_seq.parallel.process_group",
    "distributed": "ddp_seq.parallel.process_group",
    "UserError": "ddp_seq.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ddp_seq' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
