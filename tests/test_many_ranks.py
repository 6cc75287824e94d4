"""World-size independence at 4 and 8 real gloo ranks, and a resume from 8 ranks to 3.

test_world_size.py checks 1 against 2 ranks; here its tiny classify job (random batches, no clipping,
no dropout: see its PAIRS), cut by a token budget into 17 + 16 global batches of up to 16 sequences,
runs on 4 and on 8 ranks under torchrun, where shares hold 0-6 sequences (a rank with none trains a
filler step at weight 0), and must give 1 rank's losses and weights. The 8-rank run keeps its step-7
checkpoint (epoch 1, mid-epoch): a 3-rank run resumed from it must finish with the uninterrupted
run's weights. The epoch records show the figures ``ddp-seq plan`` predicts for 8 and 3 ranks.

On 2 cores this is a correctness test, not a speed one: the launches run side by side (most of
their time is 15 interpreters starting torch), the 1-rank run in this process meanwhile.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import PYTHON, REPO, Proc, child_env, kill_job
from test_world_size import PAIRS, SMALL, initial_weights, max_diff

from ddp_seq.cli import main
from ddp_seq.cli.plan import epoch_figures, sampler_options
from ddp_seq.config import load_config
from ddp_seq.data.readers.synthetic import split_lengths
from ddp_seq.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

#: At most 16 sequences and 200 padded tokens per global batch (17 + 16 steps): some global batches hold
#: fewer sequences than 8 (or 4, or 3) ranks, so those ranks train filler steps.
JOB = [*SMALL, *PAIRS["classify"][0], "data.num_train=96", "batching.max_tokens=200"]
STOP_STEP = 7  # the 8-rank run's checkpoint the 3-rank run resumes: epoch 1, position 7 of 12
CHECKPOINTS = ["checkpoint.every_steps=7", "checkpoint.keep_last=10"]


def start(root: Path, name: str, world_size: int, *overrides: str) -> subprocess.Popen:
    """torchrun of ``train.py JOB overrides`` as run ``root/name``, started and not waited for."""
    args = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}", "train.py",
            *JOB, *overrides, f"logging.root={root}", f"logging.name={name}"]
    return subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, deadline: float) -> Proc:
    """Wait for ``proc`` until ``deadline`` (then kill it and its ranks); assert exit code 0."""
    try:
        out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
    return Proc([str(a) for a in proc.args], proc.returncode, out, err).check()


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["train_loss"] for r in records(run) if r["kind"] == "train"}


def appear(path: Path, procs: list[subprocess.Popen], deadline: float) -> None:
    """Wait until ``path`` exists (checkpoints are written atomically: then it is whole)."""
    while not path.is_file():
        for proc in procs:
            if proc.poll() is not None and proc.returncode != 0:
                finish(proc, deadline)  # fails with its output
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """``w1`` (this process), ``w4``, ``w8`` (torchrun) and ``w8-w3``: 3 ranks resumed from w8's step-7
    checkpoint, started as soon as that checkpoint is written. Each run directory by name.

    The launches overlap: on 2 cores most of their time is interpreter start-up, and a rank waiting in
    a collective leaves the cores to the others."""
    root = tmp_path_factory.mktemp("ranks")
    deadline = time.monotonic() + 150
    launches = [start(root, "w8", 8, *CHECKPOINTS), start(root, "w4", 4)]
    try:
        assert main(["train", *JOB, f"logging.root={root}", "logging.name=w1"]) == 0
        stop = root / "w8" / "checkpoints" / f"step-{STOP_STEP:08d}.pt"
        appear(stop, launches, deadline)
        launches.append(start(root, "w8-w3", 3, *CHECKPOINTS, f"checkpoint.resume={stop}"))
        for proc in launches:
            finish(proc, deadline)
    finally:
        for proc in launches:
            if proc.poll() is None:
                kill_job(proc)
    return {name: root / name for name in ("w1", "w4", "w8", "w8-w3")}


@pytest.mark.parametrize("world_size", [4, 8])
def test_4_and_8_ranks_train_as_one(runs, world_size):
    one, many = runs["w1"], runs[f"w{world_size}"]
    cfg = load_config(overrides=JOB)
    planned = [epoch_figures(split_lengths(cfg.data, "train"), world_size, epoch=e, **sampler_options(cfg))
               for e in (0, 1)]
    assert len(losses(one)) == sum(p.steps for p in planned)
    assert sum(p.filler_steps for p in planned) > 0  # some ranks trained fillers
    assert list(losses(many)) == list(losses(one))
    assert list(losses(many).values()) == pytest.approx(list(losses(one).values()), rel=1e-5, abs=1e-6)
    ckpt_one, ckpt_many = load_checkpoint(one / "checkpoints" / "last.pt"), load_checkpoint(many / "checkpoints" /
                                                                                           "last.pt")
    assert max_diff(initial_weights(ckpt_one), ckpt_one["model"]) > 1e-2  # training moved the weights far
    diff = max_diff(ckpt_one["model"], ckpt_many["model"])
    assert diff <= 1e-5, f"parameters differ by {diff:.2e} between world size 1 and {world_size}"
    last_one, last_many = (next(r for r in reversed(records(run)) if r["kind"] == "epoch") for run in (one, many))
    assert last_many["val_loss"] == pytest.approx(last_one["val_loss"], rel=1e-5)
    assert last_many["val_accuracy"] == last_one["val_accuracy"]
    # The shares really differed between ranks (a mean of per-rank means would fail above).
    per_rank = [r for r in records(many) if r["kind"] == "epoch"][0]["padded_tokens_per_rank"]
    assert len(per_rank) == world_size and len(set(per_rank)) > 1


def test_8_ranks_stopped_mid_epoch_resume_on_3(runs):
    stop = load_checkpoint(runs["w8"] / "checkpoints" / f"step-{STOP_STEP:08d}.pt")
    assert (stop["sampler"]["epoch"], stop["sampler"]["position"], stop["train_state"]["step"]) == (0, STOP_STEP,
                                                                                                    STOP_STEP)
    assert not stop["train_state"]["finished"]
    resumed = load_checkpoint(runs["w8-w3"] / "checkpoints" / "last.pt")
    assert resumed["train_state"]["finished"] and resumed["train_state"]["step"] == len(losses(runs["w1"]))
    assert len(resumed["rng"]) == 3  # written by the 3 ranks
    reference = load_checkpoint(runs["w1"] / "checkpoints" / "last.pt")
    diff = max_diff(reference["model"], resumed["model"])
    assert diff <= 1e-5, f"8 -> 3 ranks: parameters differ by {diff:.2e} from the uninterrupted run"
    after = losses(runs["w8-w3"])
    assert sorted(after) == list(range(STOP_STEP + 1, len(losses(runs["w1"])) + 1))  # the steps after the stop
    whole = losses(runs["w1"])
    assert list(after.values()) == pytest.approx([whole[s] for s in after], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("run,world_size", [("w8", 8), ("w8-w3", 3)])
def test_the_epoch_records_show_what_plan_predicts(runs, run, world_size):
    """``ddp-seq plan``'s padding efficiency, straggler ratio and padded tokens are what the job records."""
    cfg = load_config(overrides=JOB)
    lengths = split_lengths(cfg.data, "train")
    epochs = [r for r in records(runs[run]) if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2]
    for record in epochs:
        predicted = epoch_figures(lengths, world_size, epoch=record["epoch"] - 1, **sampler_options(cfg))
        assert len(record["padded_tokens_per_rank"]) == world_size
        if run == "w8" or record["epoch"] == 2:  # whole epochs: w8-w3 trained epoch 1 from step 8 only
            assert sum(record["padded_tokens_per_rank"]) == predicted.padded_tokens
            assert record["real_tokens"] == predicted.real_tokens == int(np.sum(lengths))
            assert record["padding_efficiency"] == pytest.approx(predicted.padding_efficiency, rel=1e-12)
        assert record["straggler_ratio"] == pytest.approx(predicted.straggler_ratio, rel=1e-12)
