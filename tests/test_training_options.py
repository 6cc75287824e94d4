"""Trainer options exercised in one process: early stopping, bf16 autocast on CPU, fp16 refusal."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ddp_seq.cli import main

TINY = ["data.num_train=96", "data.num_val=24", "data.max_length=30", "model.hidden=8", "model.embedding_dim=8",
        "model.layers=1", "batching.batch_size=16", "training.warmup_steps=0", "logging.progress=none"]


def epochs_recorded(run: Path) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "epoch"]


def test_early_stopping_ends_after_patience_epochs_without_improvement(tmp_path, capsys):
    # A learning rate this small cannot change the val loss: epoch 1 sets the best, epoch 2 does
    # not improve on it, and patience 1 stops the run there instead of at epoch 6.
    code = main(["train", *TINY, "training.epochs=6", "training.patience=1", "training.lr=1e-12",
                 "training.monitor=val_loss", f"logging.root={tmp_path}", "logging.name=stop"])
    assert code == 0
    assert [r["epoch"] for r in epochs_recorded(tmp_path / "stop")] == [1, 2]
    assert "early stopping: val_loss did not improve for 1 epoch(s)" in capsys.readouterr().out


def test_without_patience_every_epoch_runs(tmp_path):
    assert main(["train", *TINY, "training.epochs=3", "training.lr=1e-12", f"logging.root={tmp_path}",
                 "logging.name=all"]) == 0
    assert [r["epoch"] for r in epochs_recorded(tmp_path / "all")] == [1, 2, 3]


def test_bf16_autocast_trains_on_cpu(tmp_path):
    assert main(["train", *TINY, "training.epochs=1", "training.amp=bf16", f"logging.root={tmp_path}",
                 "logging.name=bf16"]) == 0
    (epoch,) = epochs_recorded(tmp_path / "bf16")
    assert torch.isfinite(torch.tensor(epoch["train_loss"])) and 0 <= epoch["val_accuracy"] <= 1
    ckpt = torch.load(tmp_path / "bf16" / "checkpoints" / "last.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values())  # autocast leaves weights fp32


def test_fp16_on_cpu_is_refused_with_the_key(tmp_path, capsys):
    code = main(["train", *TINY, "training.amp=fp16", f"logging.root={tmp_path}", "logging.name=fp16"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training.amp" in err[0] and "CUDA" in err[0]


def test_flush_denormal_setting_reaches_torch():
    """distributed.flush_denormal decides whether denormal floats survive in this process."""
    from ddp_seq.config import DistributedConfig
    from ddp_seq.parallel.process_group import setup

    threads = torch.get_num_threads()
    try:
        setup(DistributedConfig(flush_denormal=True))
        assert torch.tensor([1e-323], dtype=torch.float64)[0] == 0  # flushed to zero
        setup(DistributedConfig(flush_denormal=False))
        assert torch.tensor([1e-323], dtype=torch.float64)[0] > 0  # IEEE denormal kept
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def test_epoch_records_hold_each_ranks_peak_memory(tmp_path):
    run = tmp_path / "rss"
    main(["train", *TINY, "training.epochs=1", f"logging.root={tmp_path}", "logging.name=rss", "checkpoint.save=false"])
    (record,) = epochs_recorded(run)
    assert len(record["peak_rss_mb"]) == 1 and 50 < record["peak_rss_mb"][0] < 100_000
