"""Shared by the tests: running real subprocesses (torchrun, train.py, the CLI), tiny configs, DDP scenarios.

Every subprocess runs with ``OMP_NUM_THREADS=1``, from the repository root, with its output
captured; a failing check prints that output. A process that outlives its timeout is killed with
the ranks it started (found through /proc), never by name.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PYTHON = sys.executable
TIMEOUT_S = 120

#: Variables torchrun sets for its workers; a child must never inherit stale ones from the parent.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@dataclass
class Proc:
    """A finished subprocess: its command, exit code and captured output."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def report(self) -> str:
        return (f"command: {' '.join(self.args)}\nexit code: {self.returncode}\n"
                f"--- stdout ---\n{self.stdout[-6000:]}\n--- stderr ---\n{self.stderr[-6000:]}")

    def check(self, returncode: int = 0) -> Proc:
        """Assert the exit code, showing the whole output if it differs."""
        assert self.returncode == returncode, self.report()
        return self


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("WANDB_MODE", "disabled")
    env.update(extra)
    return env


def parent_pid(pid: int) -> int | None:
    """The parent of process ``pid`` (from /proc), or None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (ranks and their DataLoader workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := parent_pid(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_pids(agent: int) -> dict[int, int]:
    """``{rank: pid}`` of the workers torchrun process ``agent`` started (their RANK from /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or parent_pid(int(entry.name)) != agent:
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(entry.name)
    return found


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session`` and, if it is torchrun, its workers:
    torch 2.13 starts each worker in a session of its own, out of reach of the launcher's group."""
    workers = worker_pids(proc.pid).values()
    for group in (proc.pid, *workers):
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def run(args: list[str], *, timeout: float = TIMEOUT_S, cwd: Path = REPO, **env: str) -> Proc:
    """Run ``args`` to completion (or kill it, and the workers it started, at ``timeout``)."""
    args = [str(a) for a in args]
    proc = subprocess.Popen(args, cwd=cwd, env=child_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout}s\n" + Proc(args, -9, out, err).report())
    return Proc(args, proc.returncode, out, err)


def python(*args: str | Path, **kwargs) -> Proc:
    """``python ARGS`` with this interpreter (the project's virtualenv)."""
    return run([PYTHON, *map(str, args)], **kwargs)


def torchrun(*args: str | Path, nproc: int = 2, **kwargs) -> Proc:
    """``python -m torch.distributed.run --standalone --nproc_per_node=N ARGS`` (gloo on CPU)."""
    return run([PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                *map(str, args)], **kwargs)


# -- data -----------------------------------------------------------------------------------------

def ragged(lengths: list[int], features: int, per_step: bool, seed: int = 0):
    """A :class:`SequenceData` of Gaussian sequences of these lengths, labels 0..2 per sequence or per step."""
    import numpy as np

    from ddp_seq.data.readers.synthetic import SequenceData

    rng = np.random.default_rng(seed)
    lengths_a = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths_a)]).astype(np.int64)
    values = rng.standard_normal((int(lengths_a.sum()), features)).astype(np.float32)
    targets = rng.integers(0, 3, size=int(lengths_a.sum()) if per_step else len(lengths)).astype(np.int64)
    return SequenceData(values, offsets, targets, per_step)


# -- tiny configs -------------------------------------------------------------------------------

#: A job that trains in about a second per rank on 2 cores.
TINY_YAML = """\
data:
  num_train: 200
  num_val: 51
  length_median: 10
  max_length: 30
model:
  hidden: 16
  embedding_dim: 16
training:
  epochs: 2
  warmup_steps: 2
  log_every: 5
batching:
  batch_size: 16
logging:
  progress: lines
distributed:
  backend: gloo
"""


# -- the DDP worker: one launch with 2 ranks and one without torchrun, shared by several tests ----

_COMMON = ["data.num_train=64", "data.num_val=101", "data.length_median=12", "data.max_length=40",
           "model.hidden=16", "model.embedding_dim=16", "model.layers=1", "model.dropout=0",
           "training.optimizer=sgd", "training.momentum=0", "training.warmup_steps=0", "training.grad_clip=0",
           "training.lr=0.5", "batching.strategy=random", "batching.batch_size=32",
           "batching.eval_batch_size=20",  # 101 = 5 x 20 + 1: the last eval batch has fewer samples than ranks
           "distributed.backend=gloo"]

#: name -> overrides. ``random`` batches split into shares of different sizes (see test_ddp).
DDP_SCENARIOS: dict[str, list[str]] = {
    "classify_lstm": _COMMON + ["data.task=classify", "model.cell=lstm", "model.pooling=last"],
    "tag_bigru_packed": _COMMON + ["data.task=tag", "model.cell=gru", "model.bidirectional=true",
                                   "model.execution=packed", "training.monitor=val_loss"],
    "regress_2layer_clip": _COMMON + ["data.task=regress", "training.monitor=val_mse", "model.layers=2",
                                      "model.pooling=mean", "model.execution=padded", "training.grad_clip=0.05"],
    "classify_accum2": _COMMON + ["data.task=classify", "model.cell=gru", "model.pooling=max",
                                  "model.bidirectional=true", "model.execution=padded", "training.grad_accum=2"],
}


@dataclass
class DDPRuns:
    """Where the worker wrote its files for world size 1 and 2 (see tests/workers/ddp_worker.py)."""

    out: Path
    single: Proc
    double: Proc

    def state(self, name: str, world_size: int) -> dict:
        import torch

        return torch.load(self.out / f"{name}.W{world_size}.pt", weights_only=True)

    def metrics(self, name: str, world_size: int) -> dict:
        return json.loads((self.out / f"{name}.W{world_size}.json").read_text())

    def share(self, name: str, world_size: int, rank: int) -> dict:
        return json.loads((self.out / f"{name}.W{world_size}.r{rank}.json").read_text())
