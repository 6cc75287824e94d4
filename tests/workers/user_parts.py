"""A user's own parts, defined outside ddp_seq: a Dataset without a ``lengths`` attribute, a model
that is not SeqModel, a data function -- trained through ``ddp_seq.Trainer`` (``main``) or named by
``model.target`` / ``data.target`` in a config (tests/test_user_parts.py).

``python tests/workers/user_parts.py OUT_DIR OBJECTIVE...`` (or under torchrun): trains once per
OBJECTIVE, one after the other in the same process group (one launch for several runs), and rank 0
writes ``OUT_DIR/OBJECTIVE.pt`` with each run's final weights and epoch history. OBJECTIVE is
``classify`` (the built-in) or ``loss_fn`` (the same cross-entropy as a user's loss function).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ddp_seq import PackedGRU, Trainer, load_config
from ddp_seq.parallel.process_group import distributed, exit_worker

OVERRIDES = ["batching.strategy=random", "batching.batch_size=16", "batching.eval_batch_size=8",
             "training.epochs=2", "training.lr=0.05", "training.warmup_steps=2", "training.log_every=4",
             "training.seed=3", "checkpoint.save=false", "logging.progress=none", "distributed.backend=gloo"]


class ToySequences(Dataset):
    """Noisy sequences whose class is the sign pattern of their mean features; no ``lengths`` attribute."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            label = int(rng.integers(3))
            length = int(rng.integers(1, 25))
            x = rng.normal(size=(length, 3)).astype(np.float32)
            x[:, label] += 1.0
            self.items.append((torch.from_numpy(x), label))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def make_datasets(seed: int = 0, num_train: int = 160, num_val: int = 40):
    """``data.target``: (train, val)."""
    return ToySequences(num_train, seed), ToySequences(num_val, seed + 1)


class MeanPoolGRU(nn.Module):
    """A GRU over the valid steps, mean-pooled, then a linear head; token ids go through an Embedding."""

    def __init__(self, num_inputs: int, num_outputs: int, vocab_size: int = 0, hidden: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 8) if vocab_size else nn.Linear(num_inputs, 8)
        self.rnn = PackedGRU(8, hidden)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(inputs), lengths)  # [B, T, H], zeros at padded steps
        pooled = out.sum(1) / lengths.to(out.device, out.dtype)[:, None]
        return self.head(pooled)


class PerStepOutputs(MeanPoolGRU):
    """A model that does not fit a classify objective: ``[B, T, C]`` outputs instead of ``[B, C]``."""

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(inputs), lengths)[0])


class TupleOutputs(MeanPoolGRU):
    """A model whose forward returns ``(outputs, lengths)``, as models written for other loops do."""

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor):
        return super().forward(inputs, lengths), lengths


class UnusedHead(MeanPoolGRU):
    """A model with a parameter the loss never reaches (a second head kept for later): DDP waits for
    its gradient and fails at the first step, unless ``distributed.find_unused_parameters``."""

    def __init__(self, num_inputs: int, num_outputs: int, vocab_size: int = 0, hidden: int = 12) -> None:
        super().__init__(num_inputs, num_outputs, vocab_size, hidden)
        self.aux_head = nn.Linear(hidden, 3)


def dict_datasets():
    """``data.target`` whose items are dicts, as Hugging Face datasets return them."""
    train, val = make_datasets()
    as_dict = [{"x": x, "y": y} for x, y in train.items]
    return as_dict, [{"x": x, "y": y} for x, y in val.items]


def cross_entropy_sum(outputs: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's loss function: a weighted sum over this rank's samples and their count."""
    per_sample = F.cross_entropy(outputs, batch.targets, reduction="none")
    return (per_sample * batch.weights).sum(), batch.weights.sum()


def main(out_dir: str, *objectives: str) -> int:
    dist_cfg = load_config(overrides=OVERRIDES).distributed
    train, val = make_datasets()
    with distributed(dist_cfg) as info:
        for objective in objectives:
            cfg = load_config(overrides=OVERRIDES + (["training.monitor=val_loss"] if objective == "loss_fn" else []))
            assert cfg.distributed == dist_cfg
            torch.manual_seed(cfg.training.seed)  # what the config path does before building a model
            model = MeanPoolGRU(num_inputs=3, num_outputs=3)
            trainer = Trainer(model, train, val, cfg, cross_entropy_sum if objective == "loss_fn" else "classify",
                              info=info)
            trainer.fit()
            if info.is_main:
                torch.save({"model": trainer.module.state_dict(), "history": trainer.state.history},
                           f"{out_dir}/{objective}.pt")
    return 0


if __name__ == "__main__":
    code = main(*sys.argv[1:])
    exit_worker(code)
    sys.exit(code)
