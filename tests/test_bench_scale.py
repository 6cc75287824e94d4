"""``ddp-seq bench --suite scale``: its figures against direct computations, its --quick run end to
end (result JSON, BENCHMARKS.md section, a user's data file, a bad one), and BENCHMARKS.md keeping
the other suites' sections. Timings are never asserted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DistributedSampler

from ddp_seq.bench import main as bench_main
from ddp_seq.bench import regenerate, scale
from ddp_seq.bench.report import render_markdown
from ddp_seq.data.sampler import BucketBatchSampler, padded_cost, split_shares

REPO = Path(__file__).resolve().parent.parent


def _straggler(costs: list[list[int]]) -> float:
    return sum(max(step) for step in costs) / sum(sum(step) / len(step) for step in costs)


def test_figures_of_each_sampler_match_a_direct_count():
    lengths = scale.synthetic_lengths("bimodal", 1000, seed=3)
    assert lengths.dtype == np.int16 and 1 <= lengths.min() and lengths.max() <= 400
    ranks = 3
    # ddp_seq: every rank's share of every batch, from the sampler's own split
    sampler = BucketBatchSampler(lengths, 64 * ranks, num_replicas=ranks, rank=0, seed=0)
    costs = [[padded_cost(s, lengths) for s in split_shares(b, lengths, ranks)] for b in sampler.batches()]
    row = scale.ddp_seq_row(lengths, ranks)
    assert row["steps"] == len(costs)
    assert row["padding_efficiency"] == pytest.approx(int(lengths.sum(dtype=np.int64)) / sum(map(sum, costs)))
    assert row["straggler_ratio"] == pytest.approx(_straggler(costs))
    # DistributedSampler + BatchSampler: each rank's own batches, step by step
    per_rank = []
    for r in range(ranks):
        ds = DistributedSampler(range(len(lengths)), num_replicas=ranks, rank=r, shuffle=True, seed=0)
        per_rank.append([len(b) * int(lengths[b].max()) for b in BatchSampler(ds, scale.PER_RANK, drop_last=False)])
    steps = list(zip(*per_rank))
    row = scale.distributed_row(lengths, ranks)
    assert row["steps"] == len(steps)
    assert row["straggler_ratio"] == pytest.approx(_straggler([list(s) for s in steps]))
    real = sum(int(lengths[list(ds)].sum()) for ds in (DistributedSampler(range(len(lengths)), num_replicas=ranks,
                                                                         rank=r, seed=0) for r in range(ranks)))
    assert row["padding_efficiency"] == pytest.approx(real / sum(map(sum, steps)))


def test_length_grouped_order_is_the_hf_megabatch_sort():
    lengths = scale.synthetic_lengths("lognormal", 5000, seed=1).tolist()
    order = scale.length_grouped_order(lengths, 16, torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(5000))
    mega = min(5000 // (16 * 4), 50) * 16
    assert lengths[order[0]] == max(lengths)  # the longest first
    for start in range(0, 5000, mega):
        group = [lengths[i] for i in order[start:start + mega]][1:]  # its leader may have been swapped
        assert group == sorted(group, reverse=True)
    assert order != scale.length_grouped_order(lengths, 16, torch.Generator().manual_seed(1))


def test_quick_suite_writes_its_result_and_section(tmp_path, capsys):
    n = 300
    user = np.random.default_rng(0).integers(1, 50, size=n)
    data = tmp_path / "mine.npz"
    np.savez(data, data=np.zeros((int(user.sum()), 2), np.float32), lengths=user, labels=np.zeros(n, np.int64))
    out, md = tmp_path / "scale.json", tmp_path / "BENCH.md"
    assert bench_main(["--suite", "scale", "--quick", "--lengths-from", str(data), "--out", str(out),
                       "--markdown", str(md)]) == 0
    result = json.loads(out.read_text())
    assert result["suite"] == "scale" and result["quick"] and result["complete"]
    names = {(r["lengths"], r["ranks"]) for r in result["rows"]}
    assert {("lognormal", 1), ("bimodal", 4), ("mine.npz", 1), ("mine.npz", 8)} <= names
    for r in result["rows"]:
        for peer in ("ddp_seq", "distributed", "grouped"):
            assert 0 < r[peer]["padding_efficiency"] <= 1 and r[peer]["straggler_ratio"] >= 1 - 1e-12
        assert r["ddp_seq"]["steps"] == -(-r["sequences"] // (64 * r["ranks"]))
    mine = next(r for r in result["rows"] if r["lengths"] == "mine.npz" and r["ranks"] == 8)
    sampler = BucketBatchSampler(user, 64 * 8, num_replicas=8, rank=0, seed=0)
    padded = sum(padded_cost(s, user) for b in sampler.batches() for s in split_shares(b, user, 8))
    assert mine["ddp_seq"]["padding_efficiency"] == pytest.approx(int(user.sum()) / padded)
    (probe,) = result["probes"]
    assert probe["mapped"] and probe["lengths_dtype"] == "int16" and probe["peak_rss_mb"] >= probe["rss_before_mb"]
    text = md.read_text()
    assert text.startswith("## Sampler at scale") and "| mine.npz | 300 | 8 |" in text


def test_a_bad_lengths_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert bench_main(["--suite", "scale", "--quick", "--lengths-from", str(tmp_path / "none.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"ddp-seq bench: error: {tmp_path / 'none.npz'}: no such file"]


def test_benchmarks_md_keeps_the_other_sections(tmp_path):
    """The scale section is appended after the default suite's, which stay as they were."""
    default = sorted((REPO / "bench/results").glob("2026-11-30-vm.json"))
    assert default, "precondition: a saved default-suite result"
    shutil.copy(default[0], tmp_path / default[0].name)
    quick = {"suite": "scale", "quick": False, "complete": True, "command": "ddp-seq bench --suite scale",
             "rows": [], "probes": [{"sequences": 100_000_000, "ranks": 64, "first_s": 4.0, "epoch_s": 40.0,
                                     "steps": 24_415, "lengths_dtype": "int16", "mapped": True,
                                     "rss_before_mb": 300.0, "peak_rss_mb": 900.0}],
             "machine": {"date": "2026-12-06", "host": "h", "cores": 2, "torch": "t", "python": "p",
                         "finished": "2026-12-06T00:00:00"}}
    (tmp_path / "x-scale.json").write_text(json.dumps(quick))
    md = tmp_path / "BENCHMARKS.md"
    assert regenerate(tmp_path, md, redraw=False) == 2
    text = md.read_text()
    alone = render_markdown([(json.loads(default[0].read_text()), default[0].name)])
    assert text.startswith(alone) and "## Sampler at scale" in text[len(alone):]
    assert "| first share at 100,000,000 sequences under 10 s | 4.00 s | yes |" in text
