"""Your own Dataset and your own nn.Module, trained by ``ddp_seq.Trainer`` under DDP.

    torchrun --standalone --nproc_per_node=2 examples/own_model.py     # 2 ranks (gloo on CPU)
    python examples/own_model.py                                        # one process
    python examples/own_model.py --tiny                                 # a few seconds (the tests)

The task: which of three frequencies a noisy sine wave has, from sequences of 5 to 60 steps
(lognormal lengths). The model: a ``PackedLSTM`` with attention pooling over each sequence's valid
steps. The Trainer brings the rest: the length-bucketed sampler sharded over the ranks, DDP, a loss
normalised by the global batch, exact validation over every sample once.

The file is also a ``model.target`` / ``data.target`` for the config path (configs/own-model.yaml):
``AttentionLSTM(num_inputs, num_outputs, **model.args)`` and ``make_datasets(seed, **data.args)``.
Nothing below the ``__main__`` guard runs then.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ddp_seq import PackedLSTM

#: Periods (in steps) of the three classes' sine waves.
PERIODS = (4.0, 7.0, 13.0)


class NoisySines(Dataset):
    """``n`` sequences ``[T, 1]`` float32 of a sine with a random phase and amplitude plus Gaussian
    noise; the target is the index of its period in :data:`PERIODS`. ``T`` is lognormal (median 20),
    clipped to ``[min_length, max_length]``.

    ``lengths`` (an int array) lets the sampler bucket by length without reading every item;
    ``num_outputs`` tells the config path the number of classes without a pass over the targets.
    """

    num_outputs = len(PERIODS)

    def __init__(self, n: int, seed: int, min_length: int = 5, max_length: int = 60, noise: float = 0.3) -> None:
        rng = np.random.default_rng(seed)
        self.lengths = np.clip(np.rint(rng.lognormal(np.log(20.0), 0.6, size=n)), min_length, max_length)
        self.lengths = self.lengths.astype(np.int64)
        self.targets = rng.integers(len(PERIODS), size=n)
        self.sequences = []
        for length, target in zip(self.lengths, self.targets):
            t = np.arange(length)
            phase, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 1.5)
            wave = amplitude * np.sin(2 * np.pi * t / PERIODS[target] + phase) + noise * rng.standard_normal(length)
            self.sequences.append(torch.from_numpy(wave.astype(np.float32)[:, None]))

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.sequences[i], int(self.targets[i])


def make_datasets(seed: int = 0, num_train: int = 3000, num_val: int = 600, min_length: int = 5,
                  max_length: int = 60, noise: float = 0.3) -> tuple[NoisySines, NoisySines]:
    """``(train, val)``: the ``data.target`` of configs/own-model.yaml (``data.args`` are these keywords;
    ddp_seq passes ``seed=data.seed`` too, and ``task`` only to a function that names it or takes ``**kwargs``)."""
    options = {"min_length": min_length, "max_length": max_length, "noise": noise}
    return NoisySines(num_train, seed, **options), NoisySines(num_val, seed + 1, **options)


class AttentionLSTM(nn.Module):
    """A ``PackedLSTM`` whose outputs are pooled by attention over each sequence's valid steps.

    ``forward(inputs [B, T, F], lengths [B]) -> logits [B, num_outputs]``. Padded steps get a score
    of -inf, so they get no attention weight whatever the LSTM wrote there (PackedLSTM writes zeros).
    """

    def __init__(self, num_inputs: int, num_outputs: int, hidden: int = 32, layers: int = 1, dropout: float = 0.0,
                 bidirectional: bool = False, execution: str = "auto") -> None:
        super().__init__()
        self.rnn = PackedLSTM(num_inputs, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                              bidirectional=bidirectional, execution=execution)
        width = hidden * (2 if bidirectional else 1)
        self.score = nn.Linear(width, 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_outputs))

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        outputs, _ = self.rnn(inputs, lengths)  # [B, T, width], zeros past each length
        steps = torch.arange(inputs.shape[1], device=inputs.device)
        valid = steps[None, :] < lengths.to(inputs.device)[:, None]  # [B, T], True at real steps
        scores = self.score(outputs).squeeze(-1).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(scores, dim=1)  # every row has >= 1 valid step: no NaN
        pooled = (weights.unsqueeze(-1) * outputs).sum(dim=1)
        return self.head(pooled)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a few hundred sequences, 1 epoch (for tests)")
    args = parser.parse_args(argv)

    from ddp_seq import Trainer, distributed, load_config
    from ddp_seq.loggers.runlog import make_logger
    from ddp_seq.parallel.process_group import exit_worker

    # A small Config: only what differs from the defaults (ddp-seq config-reference lists every key).
    # No checkpoints: the Trainer below gets no run_dir. (The config path, configs/own-model.yaml, saves them.)
    cfg = load_config(overrides=[
        "data.task=classify", "batching.batch_size=32", "batching.eval_batch_size=128",
        f"training.epochs={1 if args.tiny else 6}", "training.lr=0.01", "training.warmup_steps=10",
        "training.log_every=25", "training.seed=0", "checkpoint.save=false", "logging.progress=none",
        # One thread per process: the model is too small for a second thread to pay off, and on a shared
        # machine OpenMP threads waiting on each other made a one-process run 10x slower.
        "distributed.backend=gloo", "distributed.threads_per_rank=1"])
    train, val = make_datasets(seed=0, num_train=256 if args.tiny else 3000, num_val=128 if args.tiny else 600)

    with distributed(cfg.distributed) as info, tempfile.TemporaryDirectory() as log_dir:
        torch.manual_seed(cfg.training.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        model = AttentionLSTM(num_inputs=1, num_outputs=NoisySines.num_outputs, hidden=32)
        # Rank 0 prints the Trainer's lines (and writes train.log / metrics.jsonl into a throwaway
        # directory); the other ranks get a no-op logger.
        logger = make_logger(info.is_main, Path(log_dir), cfg.logging.progress)
        try:
            summary = Trainer(model, train, val, cfg, "classify", info=info, logger=logger).fit()
        finally:
            logger.close()
        if info.is_main:
            print(f"val_accuracy {summary['best_val_accuracy']:.4f}", flush=True)
    exit_worker(0)  # under torchrun: skip interpreter finalisation (a rare gloo abort, see its doc)
    return summary["best_val_accuracy"]


if __name__ == "__main__":
    main()
