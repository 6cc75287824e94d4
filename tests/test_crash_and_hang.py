"""Real failures, not simulated ones: a process killed inside a checkpoint write, a damaged newest
checkpoint, a rank that hangs (SIGSTOP) and a rank that dies (SIGKILL) under torchrun.

Every process started here is killed in ``finally`` by its process group: torchrun's group and
each worker's (torchrun starts its workers in sessions of their own, so killing torchrun's group
alone would leave them running).

The failures are real processes; the runs around them that fail nothing (the uninterrupted
reference, the resumes) go through ``ddp_seq.cli.main`` in this process, what ``python train.py``
calls: a launch costs seconds of start-up for a run of about a second, and the same code in this
process computes the same bits.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import PYTHON, REPO, TINY_YAML, child_env, python, worker_pids

from ddp_seq.cli import main
from ddp_seq.train.checkpoint import load_checkpoint

#: Kills its own process (SIGKILL, nothing can catch it) in the middle of the 2nd checkpoint write:
#: part of the bytes are in the temporary file, flushed and fsynced, the rename has not happened.
CRASH_DRIVER = """\
import io, os, signal, sys

import ddp_seq.train.checkpoint
import ddp_seq.cli

real_save = ddp_seq.train.checkpoint.torch.save
calls = 0


def save(obj, f, *args, **kwargs):
    global calls
    calls += 1
    if calls < 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


ddp_seq.train.checkpoint.torch.save = save
sys.exit(ddp_seq.cli.main(sys.argv[1:]))
"""

STEPS = 26  # TINY_YAML: 200 sequences / 16 per batch = 13 steps per epoch, 2 epochs
EVERY = ["checkpoint.every_steps=3"]
DDP_TRACEBACK = re.compile(r'File "[^"]*[/\\]ddp_seq[/\\]')


def step_name(step: int) -> str:
    return f"step-{step:08d}.pt"


def train_args(yaml_path: Path, root: Path, name: str) -> list[str]:
    return ["--config", str(yaml_path), f"logging.root={root}", f"logging.name={name}", *EVERY]


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype and got[key].shape == tensor.shape, key
        assert got[key].numpy().tobytes() == tensor.numpy().tobytes(), f"{key} differs from the uninterrupted run"


@pytest.fixture(scope="module")
def yaml_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("crash_cfg") / "tiny.yaml"
    path.write_text(TINY_YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, yaml_path) -> Path:
    """The run directory of the same config trained start to finish without any failure."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert main(["train", *train_args(yaml_path, root, "crash")]) == 0
    return root / "crash"


# -- 1. a real process killed inside a checkpoint write -----------------------------------------

@pytest.mark.slow
def test_kill_inside_a_save_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, yaml_path, uninterrupted,
                                                                              capsys):
    driver = tmp_path / "crash_driver.py"
    driver.write_text(CRASH_DRIVER, encoding="utf-8")
    root = tmp_path / "runs"
    checkpoints = root / "crash" / "checkpoints"
    args = train_args(yaml_path, root, "crash")

    crashed = python(driver, "train", *args)
    assert crashed.returncode == -signal.SIGKILL, crashed.report()

    first = checkpoints / step_name(3)
    assert first.is_file(), sorted(p.name for p in checkpoints.iterdir())
    assert not (checkpoints / step_name(6)).exists(), "the killed write must not have been renamed into place"
    state = load_checkpoint(first)
    assert state["train_state"]["step"] == 3
    assert (checkpoints / "last.pt").read_bytes() == first.read_bytes(), "last.pt must still be the first checkpoint"
    load_checkpoint(checkpoints / "last.pt")
    leftovers = sorted(checkpoints.glob(".step-*.tmp-*"))
    assert [p.name.split(".tmp-")[0] for p in leftovers] == [f".{step_name(6)}"], \
        f"expected the killed write's temporary file, found {sorted(p.name for p in checkpoints.iterdir())}"
    assert 0 < leftovers[0].stat().st_size

    capsys.readouterr()
    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert f"resuming from {first}:" in out, out
    assert not list(checkpoints.glob(".*.tmp-*")), sorted(p.name for p in checkpoints.iterdir())
    final = load_checkpoint(checkpoints / "last.pt")
    assert final["train_state"]["step"] == STEPS and final["train_state"]["finished"]
    assert_same_bits(final["model"], load_checkpoint(uninterrupted / "checkpoints" / "last.pt")["model"])


# -- 2. a damaged newest checkpoint --------------------------------------------------------------

@pytest.mark.slow
def test_resume_skips_damaged_newest_checkpoints(tmp_path, yaml_path, uninterrupted, capsys):
    """A truncated newest checkpoint (last.pt with it) and a garbage file named as an even newer one:
    both are skipped, each with a line naming it, and training resumes from the one before."""
    root = tmp_path / "runs"
    shutil.copytree(uninterrupted, root / "crash")
    checkpoints = root / "crash" / "checkpoints"
    truncated, garbage = checkpoints / step_name(STEPS), checkpoints / step_name(99999999)
    os.truncate(truncated, truncated.stat().st_size // 2)
    (checkpoints / "last.pt").unlink()  # in a real run directory last.pt is the same file (a hard link)
    os.link(truncated, checkpoints / "last.pt")
    garbage.write_bytes(b"this is not a checkpoint\n" * 40)

    capsys.readouterr()
    assert main(["train", *train_args(yaml_path, root, "crash")]) == 0
    out = capsys.readouterr().out
    for damaged in (garbage, truncated):
        assert re.search(rf"skipping {re.escape(str(damaged))}\b", out), out
    assert f"resuming from {checkpoints / step_name(STEPS - 2)}:" in out, out
    final = load_checkpoint(checkpoints / "last.pt")
    assert final["train_state"]["step"] == STEPS and final["train_state"]["finished"]
    assert_same_bits(final["model"], load_checkpoint(uninterrupted / "checkpoints" / "last.pt")["model"])


# -- 3./4. a hung rank and a dead rank under torchrun ---------------------------------------------

# The hung-rank test waits this out. 2 s never tripped falsely in 6 runs on a 2-core machine at load
# 5 (10-18 s to the first checkpoint); 3 s leaves a second more for ranks reaching a collective apart.
TIMEOUT_S = 3
# Long enough (~20 s at full speed) that the tests act while it trains; they kill it, so it never runs out.
LONG = ["data.num_train=4000", "training.epochs=20", "checkpoint.every_steps=10", f"distributed.timeout_s={TIMEOUT_S}"]


def _state(pid: int) -> str | None:
    """The process state letter (R, S, T, Z, ...), or None once it is gone (reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


class Job:
    """``torchrun --standalone --nproc_per_node=2 train.py ...`` running in the background."""

    def __init__(self, tmp: Path) -> None:
        yaml_file = tmp / "tiny.yaml"
        yaml_file.write_text(TINY_YAML, encoding="utf-8")
        self.checkpoints = tmp / "runs" / "hang" / "checkpoints"
        self.out_path, self.err_path = tmp / "stdout.txt", tmp / "stderr.txt"
        self.args = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                     "--config", str(yaml_file), f"logging.root={tmp / 'runs'}", "logging.name=hang", *LONG]
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(self.args, cwd=REPO, env=child_env(), stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.workers: dict[int, int] = {}  # rank -> pid

    def output(self) -> tuple[str, str]:
        return self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace")

    def report(self) -> str:
        out, err = self.output()
        return (f"command: {' '.join(self.args)}\nexit code: {self.proc.poll()}\n"
                f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}")

    def find_workers(self) -> dict[int, int]:
        self.workers.update(worker_pids(self.proc.pid))
        return self.workers

    def wait_for_first_checkpoint(self, limit: float = 90) -> None:
        # Any step checkpoint: step 10's own file is pruned (keep_last=2) a few tenths of a second
        # later on a fast machine, between two looks.
        deadline = time.monotonic() + limit
        while not any(self.checkpoints.glob("step-*.pt")):
            assert self.proc.poll() is None, "torchrun ended before the first checkpoint\n" + self.report()
            assert time.monotonic() < deadline, f"no checkpoint in {self.checkpoints} after {limit}s\n" + \
                self.report()
            time.sleep(0.05)
        assert set(self.find_workers()) == {0, 1}, f"workers found: {self.workers}\n" + self.report()
        assert all(_state(pid) not in (None, "Z") for pid in self.workers.values()), self.report()

    def wait(self, limit: float) -> int | None:
        try:
            return self.proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL torchrun's process group and every worker's (each worker leads its own)."""
        if self.proc.poll() is None:
            self.find_workers()
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.workers.values():
            try:
                if "train.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


def _wait_until(condition, limit: float) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``limit``."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if condition():
            return time.monotonic() - start
        time.sleep(0.1)
    return None


@pytest.mark.slow
def test_hung_rank_is_reported_by_rank_0_which_exits(tmp_path):
    job = Job(tmp_path)
    try:
        job.wait_for_first_checkpoint()
        rank0, rank1 = job.workers[0], job.workers[1]
        os.kill(rank1, signal.SIGSTOP)

        waited = _wait_until(lambda: "lost contact" in job.output()[1], TIMEOUT_S + 15)
        assert waited is not None, f"no 'lost contact' line within {TIMEOUT_S + 15}s of SIGSTOP\n" + job.report()
        out, err = job.output()
        assert re.search(r"^ddp-seq: error: rank 0 lost contact with the other ranks \(.+\); one of them died or hung "
                         rf"for longer than distributed\.timeout_s={TIMEOUT_S}$", err, re.M), job.report()
        assert _wait_until(lambda: _state(rank0) in (None, "Z"), 10) is not None, \
            "rank 0 printed the line but did not exit\n" + job.report()
        assert _state(rank1) == "T", "rank 1 should still be stopped"

        os.kill(rank1, signal.SIGKILL)
        code = job.wait(30)
        assert code is not None, "torchrun did not end within 30s of rank 1's SIGKILL\n" + job.report()
        assert code != 0, job.report()
        out, err = job.output()
        assert "train.py FAILED" in err and re.search(r"failed \(exitcode: 1\) local_rank: 0\b", err), \
            "torchrun should report rank 0 failing with exit code 1\n" + job.report()
        assert not DDP_TRACEBACK.search(out + err), "a ddp_seq traceback was printed\n" + job.report()
    finally:
        job.kill()


@pytest.mark.slow
def test_dead_rank_ends_the_job_non_zero(tmp_path):
    job = Job(tmp_path)
    try:
        job.wait_for_first_checkpoint()
        os.kill(job.workers[1], signal.SIGKILL)
        code = job.wait(TIMEOUT_S + 30)
        assert code is not None, f"torchrun still running {TIMEOUT_S + 30}s after rank 1's SIGKILL\n" + job.report()
        assert code != 0, job.report()
        assert _wait_until(lambda: _state(job.workers[0]) in (None, "Z"), 5) is not None, \
            "torchrun ended but rank 0 is still running\n" + job.report()
        out, err = job.output()
        assert not DDP_TRACEBACK.search(out + err), "a ddp_seq traceback was printed\n" + job.report()
    finally:
        job.kill()
