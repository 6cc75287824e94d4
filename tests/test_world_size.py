"""World-size invariance of whole training runs, gradient accumulation, and no hangs.

The global batch list depends on (seed, epoch) only and the loss is normalised by the global
count, so several steps of real training (Adam, warmup, cosine, clipping, evaluation) on 1 and on 2
ranks must give the same losses and the same parameters. A loss normalised as a mean of per-rank
means fails ``test_training_is_world_size_invariant`` (checked by changing trainer.train_step).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import python, torchrun

from ddp_seq.checkpoint import load_checkpoint
from ddp_seq.config import from_dict
from ddp_seq.data.synthetic import num_outputs
from ddp_seq.model import build_model

pytestmark = pytest.mark.slow

#: 12 steps of 16 sequences; random batches, so the two ranks' shares differ in size.
SMALL = ["data.num_train=192", "data.num_val=37", "data.length_median=10", "data.max_length=40",
         "model.hidden=16", "model.embedding_dim=16", "model.layers=1", "model.dropout=0",
         "batching.strategy=random", "batching.batch_size=16", "batching.eval_batch_size=8",
         "training.epochs=2", "training.warmup_steps=3", "training.log_every=1", "training.lr=0.05",
         "logging.progress=lines", "distributed.backend=gloo"]


def train(tmp: Path, name: str, world_size: int, *overrides: str):
    args = ["train.py", *SMALL, *overrides, f"logging.root={tmp}", f"logging.name={name}"]
    if world_size == 1:
        python(*args).check()
    else:
        torchrun(*args, nproc=world_size).check()
    records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return records, load_checkpoint(tmp / name / "checkpoints" / "last.pt")


def initial_weights(ckpt: dict) -> dict:
    """The weights the Trainer starts from: the same seed, the same construction."""
    cfg = from_dict(ckpt["config"])
    torch.manual_seed(cfg.training.seed)
    return build_model(cfg.data.task, ckpt["num_inputs"], num_outputs(cfg.data), cfg.model).state_dict()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_training_is_world_size_invariant(tmp_path, task):
    extra = [f"data.task={task}"] + (["training.monitor=val_loss"] if task == "tag" else [])
    one, ckpt_one = train(tmp_path, "w1", 1, *extra)
    two, ckpt_two = train(tmp_path, "w2", 2, *extra)
    losses_one = [r["train_loss"] for r in one if r["kind"] == "train"]
    losses_two = [r["train_loss"] for r in two if r["kind"] == "train"]
    assert len(losses_one) == len(losses_two) == 24  # 12 steps x 2 epochs, one record per step
    moved = max_diff(initial_weights(ckpt_one), ckpt_one["model"])
    assert moved > 1e-2, f"training must move the weights far beyond the tolerance (moved {moved:.2e})"
    assert losses_two == pytest.approx(losses_one, rel=1e-5, abs=1e-6)
    diff = max_diff(ckpt_one["model"], ckpt_two["model"])
    assert diff <= 1e-5, f"parameters differ by {diff:.2e} between world size 1 and 2"
    val_one = [r for r in one if r["kind"] == "epoch"][-1]
    val_two = [r for r in two if r["kind"] == "epoch"][-1]
    assert val_two["val_loss"] == pytest.approx(val_one["val_loss"], rel=1e-5)
    assert val_two["val_accuracy"] == pytest.approx(val_one["val_accuracy"], abs=1e-12)
    # The shares really differed (otherwise a mean of per-rank means would pass too).
    per_rank = [r for r in two if r["kind"] == "epoch"][0]["padded_tokens_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] != per_rank[1]


def test_grad_accum_equals_a_batch_twice_the_size(tmp_path):
    """Random batches are consecutive cuts of one permutation, so two batches of 8 accumulated are
    exactly the samples of one batch of 16: the runs must agree step for step."""
    common = ["training.epochs=1", "training.grad_clip=0"]
    accum, ckpt_accum = train(tmp_path, "accum", 2, *common, "batching.batch_size=8", "training.grad_accum=2")
    whole, ckpt_whole = train(tmp_path, "whole", 2, *common, "batching.batch_size=16", "training.grad_accum=1")
    steps_accum = [r["train_loss"] for r in accum if r["kind"] == "train"]
    steps_whole = [r["train_loss"] for r in whole if r["kind"] == "train"]
    assert len(steps_accum) == len(steps_whole) == 12
    assert steps_accum == pytest.approx(steps_whole, rel=1e-5)
    assert max_diff(ckpt_accum["model"], ckpt_whole["model"]) <= 1e-5


@pytest.mark.parametrize("num_train,num_val,batch_size", [(3, 1, 2), (5, 3, 4), (2, 1, 1)])
def test_tiny_odd_datasets_finish(tmp_path, num_train, num_val, batch_size):
    """Batches smaller than the world size give one rank a zero-weighted filler step: nobody waits."""
    proc = torchrun("train.py", *SMALL, f"data.num_train={num_train}", f"data.num_val={num_val}",
                    f"batching.batch_size={batch_size}", "batching.eval_batch_size=1", "training.epochs=2",
                    f"logging.root={tmp_path}", "logging.name=tiny", timeout=90).check()
    assert "best checkpoint" in proc.stdout
    ckpt = torch.load(tmp_path / "tiny" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2
