"""Ctrl-C behaves like SIGTERM: every rank stops at the same step, one checkpoint, one line, and a
documented exit code -- not a KeyboardInterrupt traceback per process with the work since the last
periodic checkpoint lost.

A terminal's Ctrl-C sends SIGINT to its foreground process group: torchrun (whose workers torch
2.13 starts in sessions of their own), which forwards it to every worker; or ``python train.py``
itself. Both are sent here as a terminal would, with DataLoader worker processes running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import PYTHON, REPO, child_env, descendants, kill_job, worker_pids

from ddp_seq.cli import main
from ddp_seq.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow
JOB = ["data.num_train=3000", "data.num_val=64", "data.length_median=10", "data.max_length=40", "model.hidden=16",
       "model.embedding_dim=16", "batching.batch_size=16", "training.epochs=1", "training.log_every=20",
       "checkpoint.every_steps=0", "checkpoint.signal_check_steps=2", "data.num_workers=1",
       "logging.progress=lines", "distributed.backend=gloo"]


def send(proc: subprocess.Popen, signum: int, target: str) -> None:
    """Deliver ``signum`` the way ``target`` names: ``group`` (a terminal's Ctrl-C: the launcher's
    process group), ``launcher`` (``kill PID`` of torchrun or python: torchrun forwards it),
    ``every`` (every process of the job at once, DataLoader workers included, as Slurm's scancel
    and a time limit do), ``rank1`` (one rank's process alone: the others learn it at the next check)."""
    if target == "group":
        os.killpg(proc.pid, signum)
    elif target == "launcher":
        proc.send_signal(signum)
    elif target == "every":
        for pid in [proc.pid, *descendants(proc.pid)]:
            os.kill(pid, signum)
    else:
        os.kill(worker_pids(proc.pid)[1], signum)


def ctrl_c_after_first_record(args: list[str], run: Path, signum: int = signal.SIGINT,
                              target: str = "group") -> tuple[int, str]:
    """Start ``args`` in a process group of its own, send ``signum`` to ``target`` (see :func:`send`)
    once the run has recorded its first training steps (no checkpoint yet: checkpoint.every_steps=0),
    and return its exit code and output."""
    proc = subprocess.Popen(args, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        metrics = run / "metrics.jsonl"
        while not (metrics.is_file() and metrics.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        send(proc, signum, target)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_job(proc)
    return proc.returncode, out


def assert_stopped_once(out: str, run: Path, name: str = "SIGINT") -> dict:
    """One stop line, no Python traceback of ddp_seq's and no KeyboardInterrupt; a checkpoint mid-epoch."""
    assert out.count(f"{name}: stopped at epoch 1, step ") == 1, out[-4000:]
    assert "KeyboardInterrupt" not in out and "DataLoader worker" not in out, out[-4000:]
    assert 'ddp_seq/' not in "".join(line for line in out.splitlines() if line.lstrip().startswith("File ")), out
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert not state["train_state"]["finished"] and 0 < state["sampler"]["position"] < 188, state["sampler"]
    return state


def test_ctrl_c_under_torchrun_stops_every_rank_at_one_step_and_resumes(tmp_path, capsys):
    args = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *JOB,
            f"logging.root={tmp_path}", "logging.name=job"]
    code, out = ctrl_c_after_first_record(args, tmp_path / "job")
    # torchrun reports its workers' stop (each exits 130) as a failure and exits 1, after printing its
    # own SignalException (torch's traceback, the only one); ddp_seq's ranks say one line between them
    assert code == 1, out[-4000:]
    assert out.count("Traceback (most recent call last)") == 1 and "SignalException" in out
    state = assert_stopped_once(out, tmp_path / "job")
    assert len(state["rng"]) == 2  # both ranks took part in the checkpoint: they stopped at one step
    assert main(["train", *JOB, f"logging.root={tmp_path}", "logging.name=job"]) == 0  # the same command, 1 rank
    resumed = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'job' / 'checkpoints'}" in resumed and "step " in resumed
    assert load_checkpoint(tmp_path / "job" / "checkpoints" / "last.pt")["train_state"]["finished"]


@pytest.mark.parametrize("target", ["every", "rank1"])  # "launcher": test_resume's SIGTERM test
def test_sigterm_with_dataloader_workers_stops_every_rank_at_one_step(tmp_path, target):
    """Issue 26, row 4: SIGTERM however it arrives -- to torchrun, to every process of the job at once
    (DataLoader workers first among them, as under Slurm), to one rank -- with a DataLoader worker
    per rank: the documented stop (one line, one checkpoint both ranks took part in, each rank
    exits 143), never ``DataLoader worker ... killed by signal``."""
    args = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *JOB,
            f"logging.root={tmp_path}", "logging.name=job"]
    code, out = ctrl_c_after_first_record(args, tmp_path / "job", signal.SIGTERM, target)
    # torchrun exits 1: after its own SignalException when it got the signal too, else after listing
    # its workers' 143 as a failure
    assert code == 1 and ("SignalException" in out or "exitcode  : 143" in out), out[-4000:]
    state = assert_stopped_once(out, tmp_path / "job", "SIGTERM")
    assert len(state["rng"]) == 2


def test_ctrl_c_of_one_process_exits_130_after_its_checkpoint(tmp_path):
    args = [PYTHON, "train.py", *JOB, f"logging.root={tmp_path}", "logging.name=one"]
    code, out = ctrl_c_after_first_record(args, tmp_path / "one")
    assert code == 130, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    assert_stopped_once(out, tmp_path / "one")
    records = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kind"] == "train" for r in records)  # stopped mid-epoch: no epoch record, no summary


LIBRARY_SCRIPT = """
import sys
sys.path.insert(0, {workers!r})
from off_road import OVERRIDES, ReviewModel, Reviews
from ddp_seq import Trainer, load_config

cfg = load_config(overrides=[*OVERRIDES, "training.epochs=2", "training.log_every=5", "checkpoint.every_steps=0"])
Trainer(ReviewModel(50, 6), Reviews(3000, 0), Reviews(64, 1), cfg, objective="classify", run_dir={run!r}).fit()
"""


def test_ctrl_c_of_a_library_trainer_exits_130_and_says_how_to_resume(tmp_path):
    """``Trainer.fit`` raises Preempted, a SystemExit with the signal's code: no traceback, exit 130."""
    script = tmp_path / "mine.py"
    script.write_text(LIBRARY_SCRIPT.format(workers=str(REPO / "tests" / "workers"), run=str(tmp_path / "mine")))
    code, out = ctrl_c_after_first_record([PYTHON, str(script)], tmp_path / "mine")
    assert code == 130 and "Traceback" not in out, out[-4000:]
    assert out.count("SIGINT: stopped at epoch 1, step ") == 1, out[-4000:]
    assert "Resume with Trainer(..., resume_from='last')." in out, out[-4000:]
    assert not load_checkpoint(tmp_path / "mine" / "checkpoints" / "last.pt")["train_state"]["finished"]
