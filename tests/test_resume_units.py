"""The pieces of resuming, without processes: checkpoint bookkeeping, RNG states, the run decision."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from ddp_seq.cli.rundir import decide_run
from ddp_seq.config import load_config
from ddp_seq.errors import UserError
from ddp_seq.train.checkpoint import RESUMABLE, check_shapes, link_latest, load_checkpoint, save_atomic
from ddp_seq.train.resume import (
    capture_rng,
    job_identity,
    newest_valid,
    prune,
    remove_partial_writes,
    restore_rng,
    step_checkpoints,
    step_path,
)


def resumable(step: int = 0) -> dict:
    """A checkpoint with every part a resume needs (empty but for the step)."""
    return {**{part: {} for part in RESUMABLE}, "train_state": {"step": step}}


def write_steps(directory, steps):
    for step in steps:
        save_atomic(resumable(step), step_path(directory, step))


def test_prune_keeps_the_newest_and_never_best(tmp_path):
    write_steps(tmp_path, [3, 10, 7, 12])
    save_atomic(resumable(), tmp_path / "best.pt")
    prune(tmp_path, keep_last=2)
    assert [s for s, _ in step_checkpoints(tmp_path)] == [10, 12]
    assert (tmp_path / "best.pt").exists()


def test_newest_valid_skips_damaged_files_and_says_so(tmp_path):
    write_steps(tmp_path, [5, 10])
    newest = step_path(tmp_path, 10)
    newest.write_bytes(newest.read_bytes()[:100])
    (tmp_path / "step-00000099.pt").write_bytes(b"garbage")
    notes = []
    assert newest_valid(tmp_path, notes.append) == step_path(tmp_path, 5)
    assert len(notes) == 2 and "step-00000099.pt" in notes[0] and "step-00000010.pt" in notes[1]
    assert newest_valid(tmp_path / "absent", notes.append) is None


def test_link_latest_points_at_the_target_and_replaces_atomically(tmp_path):
    write_steps(tmp_path, [1, 2])
    link_latest(step_path(tmp_path, 1), tmp_path / "last.pt")
    link_latest(step_path(tmp_path, 2), tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["train_state"]["step"] == 2
    assert (tmp_path / "last.pt").stat().st_ino == step_path(tmp_path, 2).stat().st_ino
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_remove_partial_writes(tmp_path):
    (tmp_path / ".step-00000004.pt.tmp-123").write_bytes(b"half")
    write_steps(tmp_path, [2])
    remove_partial_writes(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002.pt"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    save_atomic({"rng": capture_rng()}, tmp_path / "r.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    restore_rng(load_checkpoint(tmp_path / "r.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_check_shapes_names_the_parameter():
    module = torch.nn.Linear(3, 2)
    check_shapes(module.state_dict(), module, "ok.pt")
    with pytest.raises(UserError, match=r"x.pt: parameter 'weight' has shape \[2, 4\] in the checkpoint but \[2, 3\]"):
        check_shapes(torch.nn.Linear(4, 2).state_dict(), module, "x.pt")
    with pytest.raises(UserError, match="has no parameter 'bias'"):
        check_shapes({"weight": module.weight}, module, "x.pt")
    with pytest.raises(UserError, match="parameter 'extra' that this config's model lacks"):
        check_shapes({**module.state_dict(), "extra": torch.zeros(1)}, module, "x.pt")


def test_job_identity(monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert job_identity() == ""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default id says nothing
    assert job_identity() == ""
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "4242")
    assert job_identity() == "4242"


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_same_job_finds_its_run_directory_again(tmp_path, clean_env):
    cfg = load_config(overrides=[f"logging.root={tmp_path}"])
    clean_env.setenv("TORCHELASTIC_RUN_ID", "job-1")
    first, resume, _ = decide_run(cfg)
    assert resume is None and (first / ".job").read_text().strip() == "job-1"
    write_steps(first / "checkpoints", [4, 8])
    again, resume, _ = decide_run(cfg)  # torchrun restarted the workers: same id
    assert again == first and resume == step_path(first / "checkpoints", 8)
    clean_env.setenv("TORCHELASTIC_RUN_ID", "job-2")  # another job: another directory
    other, resume, _ = decide_run(cfg)
    assert other != first and resume is None


def test_resume_modes(tmp_path, clean_env):
    named = load_config(overrides=[f"logging.root={tmp_path}", "logging.name=exp"])
    run, resume, _ = decide_run(named)
    write_steps(run / "checkpoints", [6])
    (run / "metrics.jsonl").write_text("{}\n")
    assert decide_run(named)[1] == step_path(run / "checkpoints", 6)  # auto
    with pytest.raises(UserError, match="already holds a run"):
        decide_run(load_config(overrides=[f"logging.root={tmp_path}", "logging.name=exp", "checkpoint.resume=none"]))
    elsewhere = tmp_path / "elsewhere.pt"
    save_atomic(resumable(), elsewhere)
    by_path = load_config(overrides=[f"logging.root={tmp_path}", "logging.name=exp", f"checkpoint.resume={elsewhere}"])
    assert decide_run(by_path)[1] == elsewhere
    clean_env.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # a restart continues from the run's own newest
    run_dir, resume, notes = decide_run(by_path)
    assert resume == step_path(run / "checkpoints", 6) and "restart" in notes[0]
    with pytest.raises(UserError, match="absent.pt"):
        decide_run(load_config(overrides=[f"logging.root={tmp_path}", "logging.name=new",
                                           f"checkpoint.resume={tmp_path / 'absent.pt'}"]))
    assert not (tmp_path / "new").exists()  # a bad path is refused before anything is created
