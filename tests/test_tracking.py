"""wandb (and TensorBoard) for real: an offline run from a 2-rank training read back from its own
files, one run per rank with ``per_rank``, and online mode failing fast against a server that
refuses connections.

The offline run (``run-<id>.wandb``, wandb's binary transaction log of protobuf ``Record``
messages) is read with wandb's own reader: ``wandb leet inspect --json FILE`` (wandb 0.31), where
wandb-core decodes the log and prints one JSON object per record (``{"num", "type", "<type>":
{...}}``, history items and summary updates as ``{name: value}``). The Python reader older wandb
had (``wandb.sdk.internal.datastore.DataStore``) is gone from 0.31, and its public API reads runs
from a server only.

The first launch also sets ``logging.tensorboard=true``: one launch checks both trackers against
``metrics.jsonl``, the TensorBoard side with TensorBoard's own ``EventAccumulator``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_YAML, python, torchrun

from ddp_seq.cli import main

pytestmark = pytest.mark.slow


def wandb_records(path: Path) -> list[dict]:
    """The records of a ``.wandb`` file, in order, as wandb decodes them (``wandb leet inspect --json``)."""
    # WANDB_MODE=offline: the command then sends no telemetry of its own anywhere.
    proc = python("-m", "wandb", "leet", "inspect", "--json", path, timeout=60, WANDB_MODE="offline").check()
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert records and records[0]["type"] == "header", proc.report()  # the log's header, then the run's records
    return records


def read_run(path: Path) -> dict:
    """History rows, summary, config and run attributes of one offline run file."""
    history, summary, config, run = [], {}, {}, None
    for record in wandb_records(path):
        kind = record["type"]
        if kind == "history":
            history.append(record["history"]["item"])
        elif kind == "summary":
            summary.update(record["summary"]["update"])
        elif kind == "run":
            run = record["run"]
            config = run["config"]["update"]
    return {"history": history, "summary": summary, "config": config, "run": run}


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of TensorBoard event files, read by TensorBoard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def train_args(tmp: Path, name: str, *overrides: str) -> list[str]:
    yaml_path = tmp / "tiny.yaml"
    yaml_path.write_text(TINY_YAML, encoding="utf-8")
    return ["train.py", "--config", str(yaml_path), f"logging.root={tmp}", f"logging.name={name}", *overrides]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_offline_run_of_a_two_rank_training_holds_the_logged_metrics(tmp_path):
    torchrun(*train_args(tmp_path, "wb", "wandb.project=tests", "wandb.tags=a,b", "logging.tensorboard=true"),
             WANDB_MODE="offline").check()
    run_dir = tmp_path / "wb"
    files = run_files(run_dir)
    assert len(files) == 1, files  # one run, from rank 0
    run = read_run(files[0])
    metrics = records(run_dir)
    train_rows = [r for r in run["history"] if "train/train_loss" in r]
    epoch_rows = [r for r in run["history"] if "epoch/val_accuracy" in r]
    assert len(train_rows) == sum(r["kind"] == "train" for r in metrics) and len(epoch_rows) == 2
    for key in ("train/train_loss", "train/lr", "train/grad_norm", "train/seq_per_s", "train/tokens_per_s",
                "train/padding_efficiency"):
        assert key in train_rows[-1], key
    for key in ("epoch/val_loss", "epoch/straggler_ratio", "epoch/train_s", "epoch/padded_tokens_per_rank/rank0",
                "epoch/padded_tokens_per_rank/rank1", "epoch/padding_efficiency"):
        assert key in epoch_rows[-1], key
    # the same numbers as metrics.jsonl: the final val metric, the summary, the logging steps
    last_epoch = [r for r in metrics if r["kind"] == "epoch"][-1]
    summary = [r for r in metrics if r["kind"] == "summary"][-1]
    assert epoch_rows[-1]["epoch/val_accuracy"] == last_epoch["val_accuracy"]
    assert run["summary"]["best_val_accuracy"] == summary["best_val_accuracy"]
    assert [r["_step"] for r in train_rows] == [r["step"] for r in metrics if r["kind"] == "train"]
    assert 0 < train_rows[-1]["train/padding_efficiency"] <= 1 and train_rows[-1]["train/tokens_per_s"] > 0
    assert run["config"]["training"]["lr"] == 0.01 and run["run"]["tags"] == ["a", "b"]
    assert run["run"]["display_name"] == "wb" and run["run"]["project"] == "tests"
    # TensorBoard: rank 0 alone writes (one event file in the whole run directory), the records of
    # metrics.jsonl at their steps (event files hold float32)
    assert [p.parent.name for p in run_dir.rglob("events.out.tfevents.*")] == ["tensorboard"]
    board = scalars(run_dir / "tensorboard")
    epochs, trains = [r for r in metrics if r["kind"] == "epoch"], [r for r in metrics if r["kind"] == "train"]
    numbers = [k for k, v in epochs[-1].items() if k.startswith(("val_", "train_")) and isinstance(v, float)]
    assert "val_accuracy" in numbers and "train_loss" in numbers
    for key in numbers:
        assert board[f"epoch/{key}"] == [(r["step"], float(np.float32(r[key]))) for r in epochs], key
    for key in ("train_loss", "lr", "tokens_per_s"):
        assert board[f"train/{key}"] == [(r["step"], float(np.float32(r[key]))) for r in trains], key
    for rank in (0, 1):
        assert board[f"epoch/padded_tokens_per_rank/rank{rank}"] == \
            [(r["step"], r["padded_tokens_per_rank"][rank]) for r in epochs]


def test_per_rank_makes_one_run_per_rank_in_one_group(tmp_path):
    torchrun(*train_args(tmp_path, "pr", "wandb.mode=offline", "wandb.per_rank=true", "training.epochs=1"),
             WANDB_MODE="").check()
    runs = [read_run(f) for f in run_files(tmp_path / "pr")]
    assert sorted(r["run"]["display_name"] for r in runs) == ["pr-rank0", "pr-rank1"]
    assert {r["run"]["run_group"] for r in runs} == {"pr"}
    assert all(any("epoch/val_accuracy" in row for row in r["history"]) for r in runs)


def test_wandb_mode_from_the_environment_wins(tmp_path, monkeypatch):
    # In this process: the mode is read from os.environ when the run starts, as in a launched one
    # (a launch would add only a torch start-up; the launched runs above set WANDB_MODE too).
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert main(["train", *train_args(tmp_path, "env", "wandb.mode=offline", "training.epochs=1")[1:]]) == 0
    assert (tmp_path / "env" / "checkpoints" / "last.pt").is_file()  # it trained, without wandb
    assert not (tmp_path / "env" / "wandb").exists()


def test_online_without_a_server_fails_fast_with_one_line(tmp_path):
    """A server that refuses connections: one line naming wandb.mode, exit 2 on every rank, no hang
    (wandb alone retries for about 100 s). wandb.init_timeout_s=1, the least allowed: the test waits it
    out (wandb.init gives up after it, 1.1 s measured), and the line is the same for any value."""
    start = time.monotonic()
    proc = torchrun(*train_args(tmp_path, "online", "wandb.init_timeout_s=1"), WANDB_MODE="online",
                    WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40, timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.report()
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.startswith("ddp-seq: error:")]
    assert len(lines) == 1 and lines[0].startswith("ddp-seq: error: wandb.mode=online: wandb.init failed (") \
        and "gave up after wandb.init_timeout_s=1:" in lines[0], proc.report()
    assert "exitcode  : 2" in out or "exitcode: 2" in out.replace(" ", ""), proc.report()
    assert elapsed < 45, f"took {elapsed:.0f}s"
