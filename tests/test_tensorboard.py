"""``logging.tensorboard``: event files read back with TensorBoard's own reader (``EventAccumulator``).

Records of every shape metrics.jsonl holds (numbers, per-rank lists, None, strings, a nested list
like a confusion matrix) go through the real RunLogger; the scalars TensorBoard reads equal the
records, at their steps. A resumed run appends a second event file without duplicate steps. The
library Trainer writes them from ``cfg.logging.tensorboard`` alone; without the package, ``train``
stops with one line and exit 2. The real 2-rank run (rank 0 alone writes) is in test_tracking.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ddp_seq.cli import main
from ddp_seq.loggers.runlog import RunLogger
from ddp_seq.loggers.tensorboard import start_tensorboard

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` as TensorBoard reads the directory (every point kept)."""
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(value: float) -> float:
    """What an event file stores of a number (a float32 ``simple_value``)."""
    return float(np.float32(value))


def event_files(log_dir: Path) -> list[Path]:
    return sorted(log_dir.glob("events.out.tfevents.*"))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


RECORDS = [
    {"kind": "train", "epoch": 1, "step": 5, "train_loss": 0.75, "lr": 0.01, "grad_norm": None},
    {"kind": "train", "epoch": 1, "step": 10, "train_loss": 0.5, "lr": 0.02, "grad_norm": 1.25},
    {"kind": "epoch", "step": 12, "epoch": 1, "train_loss": 0.6, "val_accuracy": 0.7, "real_tokens": 1234,
     "padded_tokens_per_rank": [600, 700], "val_confusion": [[3, 1], [0, 2]], "val_classes": ["neg", "pos"],
     "note": "a string", "missing": None},
    {"kind": "summary", "best_epoch": 1, "best_val_accuracy": 0.7, "best_checkpoint": "runs/x/best.pt",
     "advice": None, "wall_s": 3.5},
]


def test_records_of_every_shape_read_back_at_their_steps(tmp_path):
    logger = RunLogger(tmp_path, "none", tracker=start_tensorboard(True, tmp_path, True))
    for record in RECORDS:
        logger.record(record)
    logger.close()
    records = jsonl(tmp_path / "metrics.jsonl")
    assert records == RECORDS
    assert len(event_files(tmp_path / "tensorboard")) == 1
    got = read_scalars(tmp_path / "tensorboard")
    # None, strings, the nested list and the list of strings are left out; grad_norm has one point.
    assert set(got) == {"train/epoch", "train/train_loss", "train/lr", "train/grad_norm", "epoch/epoch",
                        "epoch/train_loss", "epoch/val_accuracy", "epoch/real_tokens",
                        "epoch/padded_tokens_per_rank/rank0", "epoch/padded_tokens_per_rank/rank1",
                        "summary/best_epoch", "summary/best_val_accuracy", "summary/wall_s"}
    train = [r for r in records if r["kind"] == "train"]
    for key in ("train_loss", "lr", "epoch"):
        assert got[f"train/{key}"] == [(r["step"], f32(r[key])) for r in train], key
    assert got["train/grad_norm"] == [(10, 1.25)]
    epoch = records[2]
    for key in ("val_accuracy", "train_loss", "real_tokens"):
        assert got[f"epoch/{key}"] == [(epoch["step"], f32(epoch[key]))], key
    for rank, value in enumerate(epoch["padded_tokens_per_rank"]):
        assert got[f"epoch/padded_tokens_per_rank/rank{rank}"] == [(epoch["step"], value)]
    # the summary has no step: it is shown at the last step logged
    assert got["summary/best_val_accuracy"] == [(12, f32(0.7))] and got["summary/wall_s"] == [(12, 3.5)]


def test_a_resumed_run_appends_a_file_and_no_step_twice(tmp_path):
    """The first process logs steps 5..15 and dies; the resumed one starts again at step 13. The
    reader shows the first process's points before step 13 and the resumed one's from 13 on."""
    first = start_tensorboard(True, tmp_path, True)
    for step in (5, 10, 15):
        first.log({"kind": "train", "step": step, "train_loss": 1.0 / step})
    first.log({"kind": "epoch", "step": 15, "val_loss": 0.9})
    first.finish(1)
    second = start_tensorboard(True, tmp_path, True)
    for step in (13, 18):
        second.log({"kind": "train", "step": step, "train_loss": 2.0 / step})
    second.log({"kind": "epoch", "step": 18, "val_loss": 0.8})
    second.finish()
    log_dir = tmp_path / "tensorboard"
    assert len(event_files(log_dir)) == 2
    got = read_scalars(log_dir)
    assert got["train/train_loss"] == [(5, f32(1 / 5)), (10, f32(1 / 10)), (13, f32(2 / 13)), (18, f32(2 / 18))]
    assert got["epoch/val_loss"] == [(18, f32(0.8))]
    # A process that trains nothing (the run had finished) adds no file: only the summary comes.
    third = start_tensorboard(True, tmp_path, True)
    third.log({"kind": "summary", "best_val_loss": 0.8})
    third.finish()
    assert len(event_files(log_dir)) == 2


def test_only_rank_0_gets_a_writer_and_a_run_dir_is_required(tmp_path):
    from ddp_seq import UserError

    assert start_tensorboard(False, tmp_path, True) is None
    assert start_tensorboard(True, tmp_path, False) is None
    with pytest.raises(UserError, match=r"logging.tensorboard=true needs a run directory"):
        start_tensorboard(True, None, False)  # on every rank: the others would wait for rank 0 otherwise


def test_the_library_trainer_writes_them_from_the_config(tmp_path, capsys):
    """A real (tiny, one-process) Trainer with logging.tensorboard=true and run_dir: every train and
    epoch record of metrics.jsonl is in the event file, with the same values at the same steps."""
    from workers.user_parts import MeanPoolGRU, make_datasets

    from ddp_seq import Trainer, load_config

    train, val = make_datasets(num_train=32, num_val=8)
    cfg = load_config(overrides=["training.epochs=2", "batching.batch_size=8", "training.log_every=2",
                                 "logging.progress=none", "logging.tensorboard=true", "checkpoint.save=false"])
    Trainer(MeanPoolGRU(3, 3), train, val, cfg, run_dir=tmp_path).fit()
    assert "tensorboard: " in capsys.readouterr().out  # the cost line of the end of the run
    records = jsonl(tmp_path / "metrics.jsonl")
    got = read_scalars(tmp_path / "tensorboard")
    epochs, trains = [r for r in records if r["kind"] == "epoch"], [r for r in records if r["kind"] == "train"]
    assert len(epochs) == 2 and len(trains) >= 4
    for key in ("val_loss", "val_accuracy", "train_loss", "tokens_per_s"):
        assert got[f"epoch/{key}"] == [(r["step"], f32(r[key])) for r in epochs], key
    for key in ("train_loss", "lr", "seq_per_s"):
        assert got[f"train/{key}"] == [(r["step"], f32(r[key])) for r in trains], key
    summary = records[-1]
    assert got["summary/best_val_accuracy"] == [(epochs[-1]["step"], f32(summary["best_val_accuracy"]))]


def test_without_the_package_train_stops_with_one_line(tmp_path, monkeypatch, capsys):
    """torch.utils.tensorboard made unimportable (what a missing tensorboard package does): exit 2,
    one line naming the pip extra, before anything is trained."""
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    code = main(["train", "data.num_train=32", "data.num_val=8", "model.hidden=8", "model.embedding_dim=8",
                 "training.epochs=1", "logging.progress=none", "logging.tensorboard=true",
                 f"logging.root={tmp_path}", "logging.name=tb"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == ("ddp-seq: error: logging.tensorboard=true needs the tensorboard package: "
                           "pip install 'ddp-seq[tensorboard]'"), err
    run = tmp_path / "tb"
    assert not (run / "tensorboard").exists() and not (run / "metrics.jsonl").exists()
