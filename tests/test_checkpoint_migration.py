"""Checkpoints written by the code before the per-part layout (format 2) still work.

The files in ``tests/fixtures/checkpoint_v2/`` were written by ``make_checkpoint_v2.py`` running on
the format-2 code (commit e8c7b2d): a mid-epoch step checkpoint and the last checkpoint of the same
uninterrupted run, with what ``predict`` and ``evaluate`` printed from it. Loaded now, they are
migrated into parts; predicting gives the same output, and resuming the mid-epoch one ends on
bit-identical weights. Everything runs in this process (``ddp_seq.cli.main``, what ``train.py``
calls), on one thread, as the fixtures were made.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddp_seq.cli import main
from ddp_seq.train.checkpoint import FORMAT_VERSION, PARTS, RESUMABLE, load_checkpoint, trained_at

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "checkpoint_v2"
#: How far float32 weights of the same 16 steps may differ between CPUs (4e-7 measured; 10x margin).
CROSS_CPU_ATOL = 4e-6


def run_args(root: Path, name: str) -> list[str]:
    """The fixture run's overrides, with this clone's data paths."""
    saved = [line.strip() for line in (FIXTURES / "config.yaml").read_text().splitlines() if line.strip()]
    return [*saved, f"data.train_path={FIXTURES / 'train.tsv'}", f"data.val_path={FIXTURES / 'val.tsv'}",
            f"logging.root={root}", f"logging.name={name}", "logging.progress=none"]


@pytest.fixture(autouse=True)
def one_thread():
    """The fixtures were written with one thread; reductions over more may round otherwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def same(a, b) -> bool:
    """Equal values, tensors compared bit for bit, containers entry by entry."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_format_2_checkpoint_loads_as_parts():
    flat = torch.load(FIXTURES / "step-mid.pt", weights_only=True)
    assert flat["format_version"] == 2 and "position" in flat  # the fixture is what the old code wrote
    state = load_checkpoint(FIXTURES / "step-mid.pt")
    assert state["format_version"] == FORMAT_VERSION == 3
    assert set(state) == {"format_version", *PARTS} and all(part in state for part in RESUMABLE)
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config"):
        assert same(state[key], flat[key]), key
    assert state["sampler"] == {"version": 1, "epoch": flat["epoch"], "position": flat["position"],
                                "plan": flat["plan"]}
    assert (state["sampler"]["epoch"], state["sampler"]["position"], state["train_state"]["step"]) == (0, 3, 3)
    assert state["train_state"]["version"] == 2 and state["train_state"]["history"] == flat["history"]
    assert set(state["extra"]) == {"num_inputs", "num_outputs", "vocab_size", "fold", "encoding"}
    assert state["extra"]["encoding"]["classes"] == ["c0", "c1", "c2"]
    last = load_checkpoint(FIXTURES / "last.pt")
    assert trained_at(last)["epoch"] == 2 and trained_at(last)["step"] == 16
    assert trained_at(last)["metrics"] == torch.load(FIXTURES / "last.pt", weights_only=True)["metrics"]


def test_a_format_2_checkpoint_predicts_and_evaluates_as_before(tmp_path):
    out = tmp_path / "predictions.jsonl"
    assert main(["predict", "--checkpoint", str(FIXTURES / "last.pt"), "--input", str(FIXTURES / "val.tsv"),
                 "--output", str(out)]) == 0
    assert out.read_text() == (FIXTURES / "predictions.jsonl").read_text()
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(FIXTURES / "last.pt"), f"data.val_path={FIXTURES / 'val.tsv'}",
                 f"data.train_path={FIXTURES / 'train.tsv'}", "--output", str(report)]) == 0
    now, then = json.loads(report.read_text()), json.loads((FIXTURES / "eval.json").read_text())
    paths = ("checkpoint", "data")  # where this clone keeps the files
    assert {k: v for k, v in now.items() if k not in paths} == {k: v for k, v in then.items() if k not in paths}
    assert now.keys() == then.keys() and len(now) > len(paths)


def test_a_format_2_mid_epoch_checkpoint_resumes_to_the_same_weights(tmp_path):
    args = run_args(tmp_path, "resumed")
    assert main(["train", *args, f"checkpoint.resume={FIXTURES / 'step-mid.pt'}"]) == 0
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")
    reference = torch.load(FIXTURES / "last.pt", weights_only=True)  # the uninterrupted run, format 2
    assert resumed["format_version"] == 3 and set(resumed) == {"format_version", *PARTS}
    assert resumed["model"].keys() == reference["model"].keys()
    # The fixture was computed on another CPU: the same float32 ops round differently across CPUs
    # (an uninterrupted run here differs from the fixture's by up to 4e-7, measured on an AMD EPYC),
    # so the comparison across machines has a tolerance; bit-identity is checked on one machine below.
    for name, tensor in reference["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=CROSS_CPU_ATOL, msg=name)
    assert (resumed["sampler"]["epoch"], resumed["train_state"]["step"]) == (reference["epoch"], reference["step"])
    assert [r["train_loss"] for r in resumed["train_state"]["history"]] == \
        pytest.approx([r["train_loss"] for r in reference["history"]], rel=1e-5)


def test_a_format_3_checkpoint_resumes_from_its_own_parts(tmp_path):
    """Written now, mid-epoch, then resumed: bit for bit the weights of the uninterrupted run on this
    machine, and those of the fixture's uninterrupted run up to the rounding of another CPU."""
    assert main(["train", *run_args(tmp_path, "first")]) == 0  # 8 steps an epoch; every_steps=3: step 6 is saved
    mid = load_checkpoint(tmp_path / "first" / "checkpoints" / "step-00000006.pt")
    assert (mid["sampler"]["epoch"], mid["sampler"]["position"]) == (0, 6)
    assert main(["train", *run_args(tmp_path, "second"), f"checkpoint.resume={tmp_path / 'first' / 'checkpoints'}"
                 "/step-00000006.pt"]) == 0
    resumed = load_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt")
    uninterrupted = load_checkpoint(tmp_path / "first" / "checkpoints" / "last.pt")
    reference = torch.load(FIXTURES / "last.pt", weights_only=True)
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], uninterrupted["model"][name]), name
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=0, atol=CROSS_CPU_ATOL, msg=name)
