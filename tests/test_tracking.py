"""wandb for real: an offline run from a 2-rank training read back from its own files, one run per
rank with ``per_rank``, and online mode failing fast against a server that refuses connections.

wandb 0.31 writes an offline run as ``run-<id>.wandb``: a header (":W&B", magic, version) and then
leveldb-log records (32 KiB blocks; each chunk: crc32, length, type) holding wandb's protobuf
``Record`` messages. The reader below decodes them with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from helpers import TINY_YAML, python, torchrun

pytestmark = pytest.mark.slow

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            raw = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            raw, pending = pending + chunk, b""
        else:
            continue
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


def key(item) -> str:
    """A history/summary item's name: ``key``, or ``nested_key`` joined (names with a slash)."""
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> dict:
    """History rows, summary, config and run attributes of one offline run file."""
    history, summary, config, run = [], {}, {}, None
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary.update({key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "run":
            run = record.run
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
    return {"history": history, "summary": summary, "config": config, "run": run}


def run_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


def train_args(tmp: Path, name: str, *overrides: str) -> list[str]:
    yaml_path = tmp / "tiny.yaml"
    yaml_path.write_text(TINY_YAML, encoding="utf-8")
    return ["train.py", "--config", str(yaml_path), f"logging.root={tmp}", f"logging.name={name}", *overrides]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_offline_run_of_a_two_rank_training_holds_the_logged_metrics(tmp_path):
    torchrun(*train_args(tmp_path, "wb", "wandb.project=tests", "wandb.tags=a,b"), WANDB_MODE="offline").check()
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
    assert run["config"]["training"]["lr"] == 0.01 and list(run["run"].tags) == ["a", "b"]
    assert run["run"].display_name == "wb" and run["run"].project == "tests"


def test_per_rank_makes_one_run_per_rank_in_one_group(tmp_path):
    torchrun(*train_args(tmp_path, "pr", "wandb.mode=offline", "wandb.per_rank=true", "training.epochs=1"),
             WANDB_MODE="").check()
    runs = [read_run(f) for f in run_files(tmp_path / "pr")]
    assert sorted(r["run"].display_name for r in runs) == ["pr-rank0", "pr-rank1"]
    assert {r["run"].run_group for r in runs} == {"pr"}
    assert all(any("epoch/val_accuracy" in row for row in r["history"]) for r in runs)


def test_wandb_mode_from_the_environment_wins(tmp_path):
    python(*train_args(tmp_path, "env", "wandb.mode=offline", "training.epochs=1"), WANDB_MODE="disabled").check()
    assert not (tmp_path / "env" / "wandb").exists()


def test_online_without_a_server_fails_fast_with_one_line(tmp_path):
    """A server that refuses connections: one line naming wandb.mode, exit 2 on every rank, no hang
    (wandb alone retries for about 100 s)."""
    start = time.monotonic()
    proc = torchrun(*train_args(tmp_path, "online", "wandb.init_timeout_s=5"), WANDB_MODE="online",
                    WANDB_BASE_URL="http://127.0.0.1:9", WANDB_API_KEY="x" * 40, timeout=90)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.report()
    out = proc.stdout + proc.stderr
    lines = [line for line in out.splitlines() if line.startswith("ddp-seq: error:")]
    assert len(lines) == 1 and lines[0].startswith("ddp-seq: error: wandb.mode=online: wandb.init failed (") \
        and "gave up after wandb.init_timeout_s=5" in lines[0], proc.report()
    assert "exitcode  : 2" in out or "exitcode: 2" in out.replace(" ", ""), proc.report()
    assert elapsed < 45, f"took {elapsed:.0f}s"
