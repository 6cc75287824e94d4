"""Resuming: mid-epoch (bitwise on CPU), under another world size, after SIGTERM, after torchrun restarts.

The reference runs train uninterrupted and keep every step checkpoint; resuming one of those
checkpoints must reproduce the rest of the reference run. Dropout is on, so the RNG states in the
checkpoint matter: without them the resumed run draws other masks and the parameters differ.

A launch costs seconds of interpreter and torch start-up, and the runs here train for about a
second: the one-process runs go through ``ddp_seq.cli.main`` in this process (what ``python
train.py`` calls; it computes the same bits as a launch), see ``train_here``. The runs on 2 ranks
are real torchrun launches, and so is the one-process run that SIGTERM stops.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, REPO, child_env, kill_job, torchrun, worker_pids

from ddp_seq.cli import main
from ddp_seq.train.checkpoint import load_checkpoint
from ddp_seq.train.resume import EXIT_PREEMPTED

pytestmark = pytest.mark.slow

#: 12 global batches per epoch, 2 epochs; random batches so shares differ; dropout draws RNG.
SMALL = ["data.num_train=192", "data.num_val=37", "data.length_median=10", "data.max_length=40",
         "model.hidden=16", "model.embedding_dim=16", "model.layers=2", "model.dropout=0.2",
         "batching.strategy=random", "batching.batch_size=16", "batching.eval_batch_size=8",
         "training.epochs=2", "training.warmup_steps=3", "training.log_every=4", "training.lr=0.05",
         "checkpoint.every_steps=5", "checkpoint.keep_last=100",
         "logging.progress=lines", "distributed.backend=gloo"]

#: An epoch long enough (188 steps, over half a second) to be interrupted in its middle: the tests
#: act once step 20's checkpoint appears, and SIGTERM stopped one rank at steps 36-38, two ranks at
#: 24-30 on a loaded 2-core machine. One epoch: a second one would only add training time to every
#: run (resuming across an epoch end is the mid-epoch tests' job, on SMALL).
LONG = ["data.num_train=3000", "data.num_val=64", "data.length_median=10", "data.max_length=40",
        "model.hidden=16", "model.embedding_dim=16", "model.dropout=0.1", "batching.batch_size=16",
        "training.epochs=1", "training.log_every=20", "checkpoint.every_steps=20",
        "checkpoint.signal_check_steps=2", "logging.progress=lines", "distributed.backend=gloo"]


def launch(world_size: int, *args: str) -> list[str]:
    prefix = [PYTHON] if world_size == 1 else [PYTHON, "-m", "torch.distributed.run", "--standalone",
                                                f"--nproc_per_node={world_size}"]
    return [*prefix, "train.py", *args]


def train_here(*args: str) -> str:
    """``python train.py ARGS`` in this process (``ddp_seq.cli.main``); its stdout. Exit code 0 is asserted."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["train", *args])
    assert code == 0, out.getvalue()[-6000:]
    return out.getvalue()


def train(root: Path, name: str, world_size: int, *overrides: str) -> str:
    """SMALL with ``overrides`` as run ``root/name``, on 1 rank in this process or under torchrun; its stdout."""
    args = [*SMALL, *overrides, f"logging.root={root}", f"logging.name={name}"]
    if world_size == 1:
        return train_here(*args)
    return torchrun("train.py", *args, nproc=world_size).check().stdout


def final(run: Path) -> dict:
    return load_checkpoint(run / "checkpoints" / "last.pt")


def epochs(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {float((a[k] - b[k]).abs().max())}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted runs on 1 and 2 ranks, every step checkpoint kept."""
    root = tmp_path_factory.mktemp("reference")
    train(root, "w1", 1)
    train(root, "w2", 2)
    return {1: root / "w1", 2: root / "w2"}


@pytest.fixture(scope="module")
def moved_runs(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Without dropout (each rank draws its own masks, so with dropout a run cannot match another
    world size: the shares, and with them the masks, move between ranks), a chain of three runs,
    ``name -> (run directory, stdout)``: ``w1`` uninterrupted on 1 rank; ``w1-w2`` resumed from
    w1's step 5 on 2 ranks; ``w2-w1`` resumed from w1-w2's step 15 (a 2-rank checkpoint) on 1 rank.
    Uninterrupted runs on 1 and 2 ranks agree up to float summation order (test_world_size.py),
    so w1 is the uninterrupted reference of both resumed runs: one reference instead of one per
    world size, and the 2-rank checkpoint comes from a run that is tested anyway."""
    root = tmp_path_factory.mktemp("moved")
    runs = {"w1": train(root, "w1", 1, "model.dropout=0")}
    runs["w1-w2"] = train(root, "w1-w2", 2, "model.dropout=0",
                          f"checkpoint.resume={root / 'w1' / 'checkpoints' / 'step-00000005.pt'}")
    runs["w2-w1"] = train(root, "w2-w1", 1, "model.dropout=0",
                          f"checkpoint.resume={root / 'w1-w2' / 'checkpoints' / 'step-00000015.pt'}")
    return {name: (root / name, out) for name, out in runs.items()}


def test_step_checkpoints_hold_the_position_in_the_global_batch_list(reference):
    steps = sorted(p.name for p in (reference[2] / "checkpoints").glob("step-*.pt"))
    # every 5 steps mid-epoch, plus each epoch end (12 and 24)
    assert steps == [f"step-{n:08d}.pt" for n in (5, 10, 12, 15, 20, 24)]
    mid = load_checkpoint(reference[2] / "checkpoints" / "step-00000015.pt")
    assert (mid["sampler"]["epoch"], mid["sampler"]["position"], mid["train_state"]["step"]) == (1, 3, 15)
    assert len(mid["rng"]) == 2  # one RNG state per rank
    end = load_checkpoint(reference[2] / "checkpoints" / "step-00000012.pt")
    assert (end["sampler"]["epoch"], end["sampler"]["position"], len(end["train_state"]["history"])) == (1, 0, 1)
    assert final(reference[2])["train_state"]["finished"] and final(reference[2])["train_state"]["step"] == 24


def test_every_epoch_counts_each_training_token_once(reference):
    """Mid-epoch checkpoints all-reduce the token counters; the counters must stay local (an
    in-place all-reduce would count earlier steps W times over)."""
    from ddp_seq.config import load_config
    from ddp_seq.data.readers.synthetic import make_synthetic

    total = int(make_synthetic(load_config(overrides=SMALL).data, "train").lengths.sum())
    for world_size in (1, 2):
        assert [e["real_tokens"] for e in epochs(reference[world_size])] == [total, total]


# Epoch 1 on one rank and epoch 2 on two ranks: each world size and each epoch once (epoch 1 on two
# ranks is the test below, with DataLoader workers); every launch costs seconds of start-up.
@pytest.mark.parametrize(("step", "world_size"), [(5, 1), (15, 2)])
def test_mid_epoch_resume_is_bitwise(reference, tmp_path, world_size, step):
    source = reference[world_size] / "checkpoints" / f"step-{step:08d}.pt"
    out = train(tmp_path, "resumed", world_size, f"checkpoint.resume={source}")
    assert f"resuming from {source}" in out
    resumed, uninterrupted = final(tmp_path / "resumed"), final(reference[world_size])
    assert_bitwise(resumed["model"], uninterrupted["model"])
    assert resumed["train_state"]["step"] == uninterrupted["train_state"]["step"]
    assert resumed["train_state"]["history"][-1]["val_accuracy"] == \
        uninterrupted["train_state"]["history"][-1]["val_accuracy"]


def test_dataloader_workers_resume_exactly(reference, tmp_path):
    """Collate in 2 DataLoader worker processes per rank: the same batches as in-process, so a
    mid-epoch resume with workers still reproduces the uninterrupted run without them bitwise."""
    source = reference[2] / "checkpoints" / "step-00000005.pt"
    train(tmp_path, "workers", 2, "data.num_workers=2", f"checkpoint.resume={source}")
    resumed, uninterrupted = final(tmp_path / "workers"), final(reference[2])
    assert_bitwise(resumed["model"], uninterrupted["model"])
    # The resumed epoch 1 counts its tokens from the checkpoint on: each training token once.
    assert [e["real_tokens"] for e in epochs(tmp_path / "workers")] == [e["real_tokens"] for e in epochs(reference[2])]


def test_dropout_rng_is_restored(reference, tmp_path):
    """Control for the test above: the same resume with fresh RNG states must NOT be bitwise equal,
    otherwise that test could not detect a missing RNG restore."""
    state = load_checkpoint(reference[1] / "checkpoints" / "step-00000005.pt")
    for rank_state in state["rng"]:
        rank_state["torch"] = torch.manual_seed(999).get_state()
    tampered = tmp_path / "tampered.pt"
    torch.save(state, tampered)
    train(tmp_path, "tampered", 1, f"checkpoint.resume={tampered}")
    assert max_diff(final(tmp_path / "tampered")["model"], final(reference[1])["model"]) > 0


# (saved, resumed, step): the checkpoint's world size, the resumed run's, and the step it resumes at
# (5 is in epoch 1, 15 in epoch 2).
@pytest.mark.parametrize(("saved", "resumed", "step"), [(2, 1, 15), (1, 2, 5)])
def test_resume_under_another_world_size(moved_runs, saved, resumed, step):
    saved_run = moved_runs["w1" if saved == 1 else "w1-w2"][0]
    run, out = moved_runs[f"w{saved}-w{resumed}"]
    uninterrupted = moved_runs["w1"][0]
    source = saved_run / "checkpoints" / f"step-{step:08d}.pt"
    assert f"resuming from {source}" in out and f"saved with world size {saved}" in out
    # No sample of the interrupted epoch skipped or repeated: its real tokens add up to the
    # uninterrupted epoch's, and the train loss of its logging windows is the same (so for each
    # epoch the resumed run records: the interrupted one, and the one after it if any).
    ours = epochs(run)
    theirs = epochs(saved_run)[-len(ours):]
    assert [e["epoch"] for e in ours] == [e["epoch"] for e in theirs] and ours[0]["epoch"] == (1 if step < 12 else 2)
    assert [e["real_tokens"] for e in ours] == [e["real_tokens"] for e in theirs]
    assert [e["train_loss"] for e in ours] == pytest.approx([e["train_loss"] for e in theirs], rel=1e-5)
    # Same global batches, same loss normalisation: equal up to float summation order, as for
    # whole runs on 1 and 2 ranks (test_world_size.py).
    diff = max_diff(final(run)["model"], final(uninterrupted)["model"])
    assert diff <= 1e-5, f"parameters differ by {diff:.2e}"
    moved = max_diff(load_checkpoint(source)["model"], final(run)["model"])
    assert moved > 1e-2, f"the resumed part must train far beyond the tolerance (moved {moved:.2e})"


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"process ended ({proc.returncode}) before {path} appeared: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, _ = proc.communicate()
        pytest.fail(f"timed out:\n{out[-4000:]}")
    return out


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("long")
    torchrun("train.py", *LONG, f"logging.root={root}", "logging.name=ref").check()
    return root / "ref"


@pytest.mark.parametrize("world_size", [2, 1])
def test_sigterm_checkpoints_and_the_same_command_resumes(long_reference, tmp_path, world_size):
    # 2 ranks with a DataLoader worker each: SIGTERM reaches the data path too (issue 26, row 4); workers
    # do not change the batches (test_dataloader_workers_resume_exactly), so the comparison stays bitwise
    overrides = [*LONG, f"logging.root={tmp_path}", "logging.name=job", f"data.num_workers={world_size - 1}"]
    args = launch(world_size, *overrides)
    proc = start(args)
    try:
        wait_for(tmp_path / "job" / "checkpoints" / "step-00000020.pt", proc)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers, as under Slurm
        out = finish(proc)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    # a single process exits with the documented code; torchrun reports its workers' exit as a failure
    assert proc.returncode == (EXIT_PREEMPTED if world_size == 1 else 1), out
    assert "SIGTERM: stopped at epoch 1" in out and "DataLoader worker" not in out, out
    stopped = load_checkpoint(tmp_path / "job" / "checkpoints" / "last.pt")
    assert not stopped["train_state"]["finished"] and 0 < stopped["sampler"]["position"] < 188
    assert "Traceback" not in out.split("SIGTERM: stopped")[0]

    if world_size == 1:  # what `python train.py ...` runs, in this process: it resumes like any run
        again = train_here(*overrides)
    else:
        rerun = subprocess.run(args, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=180)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        again = rerun.stdout
    assert f"step {stopped['train_state']['step']}" in again and "resuming from" in again
    resumed = final(tmp_path / "job")
    assert resumed["train_state"]["finished"]
    if world_size == 2:  # same world size as the reference: bitwise
        assert_bitwise(resumed["model"], final(long_reference)["model"])


def test_elastic_restart_after_a_worker_is_killed(long_reference, tmp_path):
    """torchrun --max-restarts=2: a SIGKILLed worker makes torchrun restart the group; the new
    workers find the run directory again (same rendezvous id, no logging.name) and resume."""
    args = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=2",
            "--monitor-interval=0.5", "train.py", *LONG, f"logging.root={tmp_path}"]
    proc = start(args)
    try:
        deadline = time.monotonic() + 90
        while not list(tmp_path.glob("*/checkpoints/step-00000020.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.kill(worker_pids(proc.pid)[1], signal.SIGKILL)
        out = finish(proc, timeout=180)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    assert proc.returncode == 0, out
    runs = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # the restarted workers reused the run directory
    log = (runs[0] / "train.log").read_text()
    assert "resuming from" in log, log
    resumed, uninterrupted = final(runs[0]), final(long_reference)
    assert resumed["train_state"]["finished"]
    ours = resumed["train_state"]["history"][-1]["val_accuracy"]
    theirs = uninterrupted["train_state"]["history"][-1]["val_accuracy"]
    assert abs(ours - theirs) <= 0.02, (ours, theirs)
    assert max_diff(resumed["model"], uninterrupted["model"]) < 1e-6
