"""The benchmark suite's code runs end to end on tiny sizes (the full run is `make bench`)."""

from __future__ import annotations

import json

import pytest
from helpers import python

from ddp_seq.bench import SUITES, execution_matrix, metric_at, summarise


def test_summarise_and_metric_at_budget():
    records = [{"kind": "train", "train_loss": 1.0},
               {"kind": "epoch", "train_s": 2.0, "tokens_per_s": 100.0, "seq_per_s": 10.0,
                "padding_efficiency": 0.5, "straggler_ratio": 1.2, "val_accuracy": 0.6},
               {"kind": "epoch", "train_s": 4.0, "tokens_per_s": 50.0, "seq_per_s": 5.0,
                "padding_efficiency": 0.7, "straggler_ratio": 1.0, "val_accuracy": 0.8}]
    row = summarise(records, "val_accuracy")
    assert row["tokens_per_s"] == pytest.approx((200 + 200) / 6)  # total tokens / total time
    assert row["epoch_s"] == pytest.approx(3.0)
    assert row["final_metric"] == 0.8 and row["curve"] == [(2.0, 0.6), (6.0, 0.8)]
    assert metric_at(row["curve"], 5.9) == 0.6 and metric_at(row["curve"], 6.0) == 0.8
    assert metric_at(row["curve"], 1.0) is None


@pytest.mark.slow
def test_quick_suite_runs_every_variant(tmp_path):
    out = tmp_path / "result.json"
    proc = python("-m", "ddp_seq", "bench", "--suite", "batching", "--quick", "--repeats", "1", "--out", out,
                  timeout=240).check()
    result = json.loads(out.read_text())
    variants = SUITES["batching"]["variants"]
    assert set(result["variants"]) == set(variants)
    assert result["variants"][result["baseline"]]["speedup"] == pytest.approx(1.0)
    for name, row in result["variants"].items():
        assert row["tokens_per_s"] > 0 and 0 < row["padding_efficiency"] <= 1, name
        assert name in proc.stdout
    bucket, random = result["variants"]["bucket+auto"], result["variants"]["random+packed"]
    assert bucket["padding_efficiency"] > random["padding_efficiency"]


def test_execution_matrix_quick_covers_every_configuration():
    result = execution_matrix(repeats=1, quick=True)
    assert len(result["variants"]) == 8  # lstm/gru x uni/bi x bucketed/random
    for name, row in result["variants"].items():
        assert row["packed_tokens_per_s"] > 0 and row["padded_tokens_per_s"] > 0, name
        assert row["padded_over_packed"] == pytest.approx(row["padded_tokens_per_s"] / row["packed_tokens_per_s"])


@pytest.mark.slow
def test_quick_modes_suite_runs_dp_beside_ddp(tmp_path):
    out = tmp_path / "modes.json"
    python("-m", "ddp_seq", "bench", "--suite", "modes", "--quick", "--repeats", "1", "--out", out,
           timeout=240).check()
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {"ddp", "dp"} and result["baseline"] == "ddp"
    assert "training.mode=dp" in SUITES["modes"]["variants"]["dp"][1] and SUITES["modes"]["variants"]["dp"][0] == 1
    for name, row in result["variants"].items():
        assert row["tokens_per_s"] > 0 and 0 <= row["final_metric"] <= 1, name
