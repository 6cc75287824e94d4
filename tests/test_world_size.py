"""World-size invariance of whole training runs, gradient accumulation, and no hangs.

The global batch list depends on (seed, epoch) only and the loss is normalised by the global
count, so several steps of real training (Adam, warmup, cosine, clipping (tag), gradient
accumulation (classify), evaluation) on 1 and on 2 ranks must give the same losses and the same
parameters. A loss normalised as a mean of per-rank means fails ``test_training_is_world_size_invariant``
(checked by changing trainer.train_step).

The 2-rank runs are real torchrun launches of train.py; a 1-rank run is ``ddp_seq.cli.main(["train",
...])`` in this process -- what ``python train.py`` runs (train.py only calls it), without the
start of a new interpreter and torch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import torchrun

from ddp_seq.builders import build_seq_model
from ddp_seq.cli import main
from ddp_seq.config import from_dict, load_config
from ddp_seq.data.readers.synthetic import make_synthetic, num_outputs
from ddp_seq.data.sampler import BucketBatchSampler
from ddp_seq.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

#: 12 steps of 16 sequences; random batches, so the two ranks' shares differ in size.
SMALL = ["data.num_train=192", "data.num_val=37", "data.length_median=10", "data.max_length=40",
         "model.hidden=16", "model.embedding_dim=16", "model.layers=1", "model.dropout=0",
         "batching.strategy=random", "batching.batch_size=16", "batching.eval_batch_size=8",
         "training.epochs=2", "training.warmup_steps=3", "training.log_every=1", "training.lr=0.05",
         "logging.progress=lines", "distributed.backend=gloo"]


def train(tmp: Path, name: str, world_size: int, *overrides: str):
    args = [*SMALL, *overrides, f"logging.root={tmp}", f"logging.name={name}"]
    if world_size == 1:
        assert main(["train", *args]) == 0
    else:
        torchrun("train.py", *args, nproc=world_size).check()
    records = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return records, load_checkpoint(tmp / name / "checkpoints" / "last.pt")


def initial_weights(ckpt: dict) -> dict:
    """The weights the Trainer starts from: the same seed, the same construction."""
    cfg = from_dict(ckpt["config"])
    torch.manual_seed(cfg.training.seed)
    return build_seq_model(cfg.data.task, ckpt["extra"]["num_inputs"], num_outputs(cfg.data), cfg.model).state_dict()


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


#: What each task's pair of runs adds to SMALL: (on 1 rank, on 2 ranks). classify accumulates two
#: batches of 8 on 2 ranks (DDP's no_sync between them) against one batch of 16 in one process -- one
#: pair for the world-size and the accumulation checks, as one run with both features on -- with
#: clipping off, because clipping every step to the same norm would hide a gradient scaled wrongly
#: by a factor that varies per step; tag trains the plain 16-sequence steps, clipped (grad_clip=1).
PAIRS: dict[str, tuple[list[str], list[str]]] = {
    "classify": (["data.task=classify", "training.grad_clip=0", "batching.batch_size=16", "training.grad_accum=1"],
                 ["data.task=classify", "training.grad_clip=0", "batching.batch_size=8", "training.grad_accum=2"]),
    "tag": (["data.task=tag", "training.monitor=val_loss"], ["data.task=tag", "training.monitor=val_loss"]),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """``pairs(task)``: ((records, last checkpoint) on 1 rank, the same on 2 ranks), trained once per
    task for the module (test_grad_accum_equals_a_batch_twice_the_size reuses classify's)."""
    done: dict[str, tuple] = {}

    def get(task: str) -> tuple:
        if task not in done:
            tmp = tmp_path_factory.mktemp(task)
            one_rank, two_ranks = PAIRS[task]
            done[task] = (train(tmp, "w1", 1, *one_rank), train(tmp, "w2", 2, *two_ranks))
        return done[task]
    return get


@pytest.mark.parametrize("task", ["classify", "tag"])
def test_training_is_world_size_invariant(pairs, task):
    (one, ckpt_one), (two, ckpt_two) = pairs(task)
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


def test_grad_accum_equals_a_batch_twice_the_size(pairs):
    """Random batches are consecutive cuts of one permutation, so two batches of 8 accumulated are
    exactly the samples of one batch of 16: the runs must agree step for step.

    classify's pair (see PAIRS): 2 ranks accumulating against one process with the whole batch, which
    a 2-rank run of it matches (tag's pair, and test_ddp's one-step checks); until now a second 2-rank
    launch trained the batch of 16, for one epoch."""
    (whole, ckpt_whole), (accum, ckpt_accum) = pairs("classify")
    config_whole, config_accum = ckpt_whole["config"], ckpt_accum["config"]
    assert (config_accum["batching"]["batch_size"], config_accum["training"]["grad_accum"]) == (8, 2)
    assert (config_whole["batching"]["batch_size"], config_whole["training"]["grad_accum"]) == (16, 1)
    assert config_accum["training"]["grad_clip"] == config_whole["training"]["grad_clip"] == 0
    steps_accum = [r["train_loss"] for r in accum if r["kind"] == "train"]
    steps_whole = [r["train_loss"] for r in whole if r["kind"] == "train"]
    assert len(steps_accum) == len(steps_whole) == 24  # 12 optimizer steps x 2 epochs
    assert steps_accum == pytest.approx(steps_whole, rel=1e-5)
    assert max_diff(ckpt_accum["model"], ckpt_whole["model"]) <= 1e-5


#: 3 training sequences in batches of 2 and 2 validation sequences in batches of 1, on 3 ranks.
TINY_ODD = ["data.num_train=3", "data.num_val=2", "batching.batch_size=2", "batching.eval_batch_size=1"]


def filler_pattern(world_size: int) -> tuple[list[list[bool]], list[list[bool]]]:
    """Which ranks get a real share of each global batch: train steps of both epochs, then validation."""
    cfg = load_config(overrides=SMALL + TINY_ODD)

    def steps(split: str, batch_size: int, shuffle: bool, epoch: int) -> list[list[bool]]:
        lengths = make_synthetic(cfg.data, split).lengths
        samplers = [BucketBatchSampler(lengths, batch_size, num_replicas=world_size, rank=r, strategy="random",
                                       seed=cfg.training.seed, shuffle=shuffle) for r in range(world_size)]
        for sampler in samplers:
            sampler.set_epoch(epoch)
        return [[share.real for share in step] for step in zip(*samplers)]

    train_steps = [s for epoch in range(cfg.training.epochs) for s in steps("train", 2, True, epoch)]
    return train_steps, steps("val", 1, False, 0)


def test_tiny_odd_datasets_finish(tmp_path):
    """Batches smaller than the world size give ranks a zero-weighted filler step: nobody waits.

    One 3-rank launch holds every pattern the three 2-rank cases (3,1,2), (5,3,4), (2,1,1) (train,
    val, batch size) had, checked below from the sampler: a rank that is a filler at every step of
    training and validation (2,1,1), a rank with real and filler steps (3,1,2) and (5,3,4), steps
    where every rank but one is a filler, several validation batches each with fillers (5,3,4),
    and fewer validation sequences than ranks."""
    train_steps, val_steps = filler_pattern(3)
    assert len(train_steps) == 4 and all(not all(step) for step in train_steps)  # every step has a filler
    assert not any(step[2] for step in train_steps + val_steps)  # rank 2: a filler throughout
    assert {step[1] for step in train_steps} == {True, False}  # rank 1: real and filler steps
    assert any(step == [True, False, False] for step in train_steps)
    assert len(val_steps) == 2 and all(step == [True, False, False] for step in val_steps)
    proc = torchrun("train.py", *SMALL, *TINY_ODD, f"logging.root={tmp_path}", "logging.name=tiny",
                    nproc=3, timeout=90).check()
    assert "best checkpoint" in proc.stdout
    ckpt = torch.load(tmp_path / "tiny" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["sampler"]["epoch"] == 2
