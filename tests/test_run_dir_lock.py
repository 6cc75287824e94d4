"""A run directory has one writer at a time (issue 26, row 3): every command that writes into a run
directory is refused, in one line naming the holder, while another live process holds it; a
holder that died leaves no lock behind (and is named); unnamed run directories of jobs started in
the same second never collide.

The other job is a real process (``tests/workers/hold_run_dir.py``, or a real training run).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PYTHON, REPO, TESTS, child_env

from ddp_seq import Trainer, cross_validate
from ddp_seq.cli import main
from ddp_seq.cli.rundir import choose_run_dir
from ddp_seq.config import load_config
from ddp_seq.errors import UserError
from ddp_seq.train.run_dir import LOCK_FILE, is_held, lock_run_dir, release_run_dir

SMALL = ["data.num_train=48", "data.num_val=8", "data.length_median=5", "data.max_length=10", "model.hidden=8",
         "model.embedding_dim=8", "model.layers=1", "batching.batch_size=16", "training.epochs=1",
         "logging.progress=none"]


class Holder:
    """Another process holding ``run_dir``: ``release()`` ends it cleanly, ``kill()`` as a crash would."""

    def __init__(self, run_dir: Path) -> None:
        self.proc = subprocess.Popen([PYTHON, str(TESTS / "workers" / "hold_run_dir.py"), str(run_dir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     env=child_env())
        assert self.proc.stdout.readline().strip() == "held"

    def release(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def held(tmp_path):
    run = tmp_path / "busy"
    holder = Holder(run)
    yield run, holder
    if holder.proc.poll() is None:
        holder.kill()


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class Items(torch.utils.data.Dataset):
    def __init__(self, n: int = 24) -> None:
        rng = np.random.default_rng(0)
        self.items = [(torch.randn(int(rng.integers(2, 6)), 3), int(i % 2)) for i in range(n)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_model():
    from ddp_seq import PackedLSTM

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = PackedLSTM(3, 4), torch.nn.Linear(4, 2)

        def forward(self, inputs, lengths):
            _, last = self.rnn(inputs, lengths)  # [B, 4]
            return self.head(last)

    return Model()


def test_every_writer_is_refused_while_another_process_holds_the_directory(held, capsys):
    run, holder = held
    (run / "notes.txt").write_text("mine\n")
    before = snapshot(run)
    pid = str(holder.proc.pid)
    cfg = load_config(None, [*SMALL, "logging.progress=none"])
    writers = {
        "train": lambda: main(["train", *SMALL, f"logging.root={run.parent}", f"logging.name={run.name}"]),
        "k-fold": lambda: main(["train", *SMALL, "data.folds=2", f"logging.root={run.parent}",
                                f"logging.name={run.name}"]),
        "Trainer": lambda: Trainer(make_model(), Items(), Items(8), cfg, "classify", run_dir=run),
        "cross_validate": lambda: cross_validate(make_model, Items(), 2, cfg, "classify", run_dir=run),
    }
    for name, write in writers.items():
        capsys.readouterr()
        try:
            code = write()
            message = capsys.readouterr().err.strip()
            assert code == 2 and len(message.splitlines()) == 1, (name, message)
        except UserError as e:
            message = str(e)
        assert "is in use by another job" in message and f"pid {pid} " in message and str(run) in message, name
        assert snapshot(run) == before, name  # nothing written, nothing lost
        assert not is_held(run)
    holder.release()
    assert (run / LOCK_FILE).read_bytes() == b""  # a clean release leaves an empty lock file
    assert main(["train", *SMALL, f"logging.root={run.parent}", f"logging.name={run.name}"]) == 0
    assert "ended without releasing" not in capsys.readouterr().out
    assert not is_held(run)  # released when the job ended


def test_a_crashed_holder_leaves_no_lock_and_is_named(held, capsys):
    run, holder = held
    pid = holder.proc.pid
    holder.kill()
    capsys.readouterr()
    assert main(["train", *SMALL, f"logging.root={run.parent}", f"logging.name={run.name}"]) == 0
    out = capsys.readouterr().out
    assert f"its previous job (pid {pid} on" in out and "ended without releasing the run directory" in out


def test_the_library_trainer_releases_the_directory_when_fit_ends(tmp_path):
    cfg = load_config(None, [*SMALL, "logging.progress=none"])
    trainer = Trainer(make_model(), Items(), Items(8), cfg, "classify", run_dir=tmp_path / "lib")
    assert is_held(tmp_path / "lib")
    trainer.fit()
    assert not is_held(tmp_path / "lib")
    Holder(tmp_path / "lib").release()  # another process can take it now


def _choose(cfg_args, barrier, out) -> None:
    barrier.wait()
    out.put(choose_run_dir(load_config(None, cfg_args)).name)


def test_unnamed_run_directories_of_simultaneous_jobs_never_collide(tmp_path, monkeypatch):
    """8 processes choosing an unnamed run directory in the same second, 5 times (the old check-then-
    create collided in 2 of 30 trials): 8 distinct directories each time."""
    context = multiprocessing.get_context("fork")
    for trial in range(5):
        root = tmp_path / f"trial-{trial}"
        barrier, out = context.Barrier(8), context.Queue()
        procs = [context.Process(target=_choose, args=([f"logging.root={root}"], barrier, out)) for _ in range(8)]
        for p in procs:
            p.start()
        names = [out.get(timeout=60) for _ in procs]
        for p in procs:
            p.join(timeout=60)
        assert len(set(names)) == 8, names
        assert sorted(p.name for p in root.iterdir()) == sorted(names)


def test_an_unnamed_directory_is_taken_by_mkdir_not_by_a_check(tmp_path, monkeypatch):
    """Whatever a check for existence says, a directory that exists is never chosen: mkdir decides."""
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # a check that lies, as a race makes it
    (tmp_path / "classify-20260101-000000").mkdir()
    (tmp_path / "classify-20260101-000000-2").mkdir()
    name = choose_run_dir(load_config(None, [f"logging.root={tmp_path}"])).name
    release_run_dir()
    assert name == "classify-20260101-000000-3"


def test_the_same_process_may_take_its_directory_again(tmp_path):
    assert lock_run_dir(tmp_path / "x", "k") == [] and lock_run_dir(tmp_path / "x", "k") == []
    release_run_dir(tmp_path / "x")
    assert not is_held(tmp_path / "x")
    assert os.path.getsize(tmp_path / "x" / LOCK_FILE) == 0


@pytest.mark.slow
def test_a_second_job_cannot_write_into_a_training_run(tmp_path, capsys):
    """The bug report: a second ``train.py logging.name=x`` while the first trains into ``x``."""
    args = [*SMALL, "training.epochs=12", "data.num_train=256", f"logging.root={tmp_path}", "logging.name=x"]
    first = subprocess.Popen([PYTHON, "train.py", *args], cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "x" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not (metrics.is_file() and metrics.stat().st_size) and time.monotonic() < deadline:
        assert first.poll() is None, first.stdout.read()
        time.sleep(0.2)
    capsys.readouterr()
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert f"pid {first.pid} " in err and "is in use by another job" in err, err
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
    epochs = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines() if '"kind": "epoch"' in x]
    assert epochs == list(range(1, 13))
