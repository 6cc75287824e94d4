"""The benchmark suite: its pure summaries and targets, the reference loop's model, and every runner
end to end on tiny sizes (the full run is `make bench`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from helpers import python

from ddp_seq.bench import execution_matrix, metric_at, summarise
from ddp_seq.bench.report import STEP_TITLE, newest_per_device, render_markdown, render_text, targets
from ddp_seq.bench.suite import (
    LONG,
    QUICK,
    SUITES,
    Variant,
    command,
    default_variant,
    finish_part,
    launch_of,
    lightning_installed,
    medians,
    missing,
    quick_plan,
    task_of,
)

REPO_RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def epoch(train_s, tokens_per_s, metric, rss=(100.0,)):
    return {"kind": "epoch", "train_s": train_s, "tokens_per_s": tokens_per_s, "seq_per_s": 10.0,
            "padding_efficiency": 0.5, "straggler_ratio": 1.2, "val_accuracy": metric, "peak_rss_mb": list(rss)}


def test_summarise_and_metric_at_budget():
    records = [{"kind": "train", "train_loss": 1.0}, epoch(2.0, 100.0, 0.6, (90.0, 80.0)),
               epoch(4.0, 50.0, 0.8, (95.0, 70.0))]
    row = summarise(records, "val_accuracy")
    assert row["tokens_per_s"] == pytest.approx((200 + 200) / 6)  # total tokens / total time
    assert row["epoch_s"] == pytest.approx(3.0)
    assert row["final_metric"] == 0.8 and row["curve"] == [(2.0, 0.6), (6.0, 0.8)]
    assert row["peak_rss_mb"] == [95.0, 80.0]  # per rank, the peak over epochs
    assert metric_at(row["curve"], 5.9) == 0.6 and metric_at(row["curve"], 6.0) == 0.8
    assert metric_at(row["curve"], 1.0) is None


def test_medians_and_ratios_against_the_baseline():
    def run(tokens_per_s, seconds, metric):
        return summarise([epoch(seconds, tokens_per_s, metric)], "val_accuracy")

    runs = {"reference": [run(10.0, 30.0, 0.5), run(12.0, 25.0, 0.6), run(8.0, 40.0, 0.4)],
            "ddp bucket+padded": [run(100.0, 3.0, 0.55), run(130.0, 2.0, 0.6), run(90.0, 3.5, 0.5)]}
    part = finish_part(runs, "reference", "ddp bucket+padded")
    ref, ours = part["variants"]["reference"], part["variants"]["ddp bucket+padded"]
    assert ref["tokens_per_s"] == 10.0 and ours["tokens_per_s"] == 100.0  # medians, not means
    assert ours["vs_baseline"] == pytest.approx(10.0) and ref["vs_baseline"] == 1.0
    assert ref["curve"] == [(30.0, 0.5)]  # the curve of the median-throughput run
    assert part["budget_s"] == 3.0  # the default configuration's median-speed run's training time
    assert ours["metric_at_budget"] == 0.55 and ref["metric_at_budget"] is None


def test_missing_names_why_a_variant_cannot_run():
    gpu, both = Variant("dp x", "ddp_seq", needs=("cuda",)), Variant("l", "lightning", needs=("cpu", "lightning"))
    assert missing(gpu, has_cuda=False, has_lightning=True) == "needs a CUDA GPU"
    assert missing(gpu, has_cuda=True, has_lightning=False) is None
    assert "pytorch-lightning" in missing(both, has_cuda=False, has_lightning=False)
    assert missing(both, has_cuda=True, has_lightning=True) == "CPU only"
    assert missing(both, has_cuda=False, has_lightning=True) is None
    # dp runs on a CPU but is measured on GPUs only; --quick measures nothing and runs it anyway.
    dp = Variant("dp y", "ddp_seq", 1, ("training.mode=dp",), needs=("gpus",))
    assert missing(dp, has_cuda=False, has_lightning=True) == "needs a CUDA GPU"
    assert missing(dp, has_cuda=False, has_lightning=True, quick=True) is None
    assert missing(gpu, has_cuda=False, has_lightning=True, quick=True) == "needs a CUDA GPU"
    assert missing(dp, has_cuda=True, has_lightning=False) is None


def test_default_suite_has_the_issue_matrix():
    names = {v.name for v in SUITES["default"]["classify"].variants}
    for where in ("single", "ddp", "dp"):
        assert {f"{where} {s}+{e}" for s in ("random", "bucket") for e in ("packed", "padded")} <= names
    assert {"reference", "single-1thread bucket+padded", "lightning default", "lightning tuned"} <= names
    assert {"reference", "ddp bucket+padded"} <= {v.name for v in SUITES["default"]["tag"].variants}


def _part(rows):
    variants = {name: {"tokens_per_s": tps, "final_metric": metric, "curve": curve}
                for name, (tps, metric, curve) in rows.items()}
    return {"parts": {"classify": {"variants": variants, "default": "ddp bucket+padded", "monitor": "val_accuracy"}}}


def test_quick_plan_runs_each_tasks_baseline_and_default_and_each_launch_once():
    parts = SUITES["default"]
    plan = quick_plan(parts)
    # Baseline and default once per task: the short part is classify on other sizes, so it leaves
    # both rows to the classify part.
    assert [task_of(part) for part in parts.values()] == ["classify", "tag", "classify"]
    required = {(name, row) for name in ("classify", "tag") for row in (parts[name].baseline,
                                                                         default_variant(parts[name]))}
    assert None not in {row for _, row in required} and required <= plan
    assert not {("short", parts["short"].baseline), ("short", default_variant(parts["short"]))} & plan
    launch = {(name, v.name): launch_of(v) for name, part in parts.items() for v in part.variants}
    assert {launch[row] for row in plan} == set(launch.values())  # every runner x launch runs somewhere
    assert {("reference", 1, "", ""), ("ddp_seq", 1, "", "ddp"), ("ddp_seq", 0, "", "ddp"), ("ddp_seq", 1, "", "dp"),
            ("lightning", 2, "default", ""), ("lightning", 2, "tuned", ""), ("minimal", 0, "none", ""),
            ("minimal", 0, "ddp", "")} == set(launch.values())
    extra = plan - required
    assert len({launch[row] for row in extra}) == len(extra)  # beyond those, each launch runs once
    assert len(plan) < sum(len(part.variants) for part in parts.values()) / 2
    # A suite without a default row (modes): its baseline, and the dp launch beside it.
    assert quick_plan(SUITES["modes"]) == {("classify", "ddp"), ("classify", "dp")}


def test_targets_are_checked_against_the_measured_ratios():
    result = _part({"reference": (10.0, 0.90, [(100.0, 0.90)]),
                    "ddp bucket+padded": (105.0, 0.91, [(5.0, 0.8), (10.0, 0.91)]),
                    "single-1thread bucket+padded": (60.0, 0.9, [(1.0, 0.9)]),
                    "single bucket+padded": (95.0, 0.9, [(1.0, 0.9)]),
                    "lightning default": (9.0, 0.95, [(8.0, 0.5), (110.0, 0.95)]),
                    "lightning tuned": (108.0, 0.9, [(1.0, 0.9)])})
    met = {row["target"]: row["met"] for row in targets(result)}
    assert met["default config >= 10x reference tokens/s"] == "yes"  # 10.5x
    assert met["... at equal or better val_accuracy (fixed epochs)"] == "yes"  # 0.91 >= 0.90
    assert met["ddp 2 ranks >= 1.85x single 1 thread"] == "NO"  # 1.75x
    assert met["ddp 2 ranks >= 1.15x single 2 threads"] == "NO"  # 1.105x
    assert met["ddp >= 10x Lightning DDP (default setup) tokens/s"] == "yes"  # 11.7x
    # Equal wall-clock, without the longer run: at 100 s / 110 s the default had finished with 0.91.
    assert met["... val_accuracy at reference's training time (100s) >= reference's"] == "yes"  # 0.91 >= 0.90
    assert met["... val_accuracy at lightning default's training time (110s) >= lightning default's"] == "NO"
    assert met["ddp within 2% of Lightning given ddp_seq's sampler + padded path"] == "NO"  # 105/108 = 0.972
    result["parts"]["classify"]["variants"]["lightning tuned"]["tokens_per_s"] = 107.0  # 105/107 = 0.981
    met = {row["target"]: row["met"] for row in targets(result)}
    assert met["ddp within 2% of Lightning given ddp_seq's sampler + padded path"] == "yes"
    # With the default given 4x the epochs, its curve at Lightning's 110 s is what counts: 0.97 >= 0.95.
    result["parts"]["classify"]["variants"][LONG] = {"tokens_per_s": 105.0, "final_metric": 0.99,
                                                     "curve": [(5.0, 0.8), (50.0, 0.97), (120.0, 0.99)]}
    met = {row["target"]: row["met"] for row in targets(result)}
    assert met["... val_accuracy at lightning default's training time (110s) >= lightning default's"] == "yes"
    # Beside the ratio of medians (the judged figure), the ratio within each repeat.
    variants = result["parts"]["classify"]["variants"]
    variants["ddp bucket+padded"]["runs_tokens_per_s"] = [100.0, 120.0, 105.0]
    variants["single bucket+padded"]["runs_tokens_per_s"] = [80.0, 100.0, 95.0]
    measured = {row["target"]: row["measured"] for row in targets(result)}
    assert measured["ddp 2 ranks >= 1.15x single 2 threads"] == "1.11x (per repeat 1.25 / 1.20 / 1.11)"
    assert targets({"parts": {}}) == []

def steps(epoch_record, step, data, forward, backward, sync, optimizer, other, share):
    """``epoch_record`` with the trainer's per-rank step-time breakdown (lists: one value per rank)."""
    return {**epoch_record, "step_ms": step, "step_ms_data": data, "step_ms_forward": forward,
            "step_ms_backward": backward, "step_ms_sync": sync, "step_ms_optimizer": optimizer,
            "step_ms_other": other, "sync_share": share}


def test_summarise_carries_the_step_time_breakdown_as_mean_over_epochs_of_rank_means():
    records = [steps(epoch(2.0, 100.0, 0.6, (90.0, 80.0)), [10.0, 12.0], [1.0, 1.0], [3.0, 5.0], [4.0, 4.0],
                     [1.0, 1.0], [0.5, 0.5], [0.5, 0.5], 0.1),
               steps(epoch(4.0, 50.0, 0.8, (95.0, 70.0)), [14.0, 16.0], [2.0, 2.0], [5.0, 7.0], [4.0, 6.0],
                     [2.0, 2.0], [0.5, 0.5], [0.5, 0.5], 0.3)]
    row = summarise(records, "val_accuracy")
    assert row["step_ms"] == pytest.approx(13.0)  # epoch means 11 and 15
    assert row["data_ms"] == pytest.approx(1.5) and row["forward_ms"] == pytest.approx(5.0)
    assert row["backward_ms"] == pytest.approx(4.5) and row["sync_ms"] == pytest.approx(1.5)
    assert row["optimizer_ms"] == pytest.approx(0.5) and row["other_ms"] == pytest.approx(0.5)
    assert row["sync_share"] == pytest.approx(0.2)
    assert row["tokens_per_s"] == pytest.approx(400 / 6)  # the rest of the summary unchanged
    # The reference, minimal and Lightning runners write no breakdown: every figure is None.
    old = summarise([epoch(2.0, 100.0, 0.6), epoch(4.0, 50.0, 0.8)], "val_accuracy")
    assert all(old[k] is None for k in ("step_ms", "data_ms", "forward_ms", "backward_ms", "sync_ms",
                                        "optimizer_ms", "other_ms", "sync_share"))
    assert old["tokens_per_s"] == pytest.approx(400 / 6)


def test_medians_skip_figures_a_repeat_lacks_and_keep_none_where_none_has_them():
    with_steps = [summarise([steps(epoch(s, tps, 0.5), [ms, ms], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [0.0, 0.0],
                                   [1.0, 1.0], [1.0, 1.0], 0.0)], "val_accuracy")
                  for s, tps, ms in ((1.0, 10.0, 8.0), (1.0, 30.0, 9.0), (1.0, 20.0, 30.0))]
    row = medians(with_steps)
    assert row["step_ms"] == 9.0 and row["tokens_per_s"] == 20.0 and row["sync_ms"] == 0.0
    without = [summarise([epoch(1.0, tps, 0.5)], "val_accuracy") for tps in (10.0, 30.0, 20.0)]
    row = medians(without)
    assert row["step_ms"] is None and row["sync_share"] is None and row["tokens_per_s"] == 20.0
    row = medians([with_steps[0], without[1]])  # one repeat with, one without: the one that has it
    assert row["step_ms"] == 8.0 and row["tokens_per_s"] == 20.0
    part = finish_part({"reference": without, "ddp bucket+padded": with_steps}, "reference", "ddp bucket+padded")
    assert part["variants"]["reference"]["step_ms"] is None and part["variants"]["ddp bucket+padded"]["step_ms"] == 9.0


def test_short_and_amp_suites_and_the_minimal_runner_command(tmp_path):
    from ddp_seq.config import load_config

    short = SUITES["short"]["short"]
    assert SUITES["default"]["short"] == short and set(SUITES["short"]) == {"short"}
    assert [v.name for v in short.variants] == [
        "reference", "single bucket+padded", "ddp bucket+padded", "minimal no sync", "minimal ddp",
        "single bucket+padded, bf16", "ddp bucket+padded, bf16"] and short.baseline == "reference"
    byname = {v.name: v for v in short.variants}
    assert (byname["minimal no sync"].runner, byname["minimal no sync"].setup) == ("minimal", "none")
    assert (byname["minimal ddp"].runner, byname["minimal ddp"].setup) == ("minimal", "ddp")
    assert all(v.world_size == 0 for n, v in byname.items() if n.startswith(("ddp", "minimal")))
    assert "training.amp=bf16" in byname["ddp bucket+padded, bf16"].overrides
    # The sizes are real config keys, at full size and under --quick (QUICK comes last and wins).
    cfg = load_config("configs/default.yaml", list(short.base))
    assert (cfg.data.num_train, cfg.data.length_median, cfg.data.length_sigma, cfg.data.max_length) == (
        28800, 8.0, 0.4, 30)
    assert (cfg.model.hidden, cfg.model.layers, cfg.training.epochs, cfg.data.noise) == (256, 1, 2, 0.5)
    quick = load_config("configs/default.yaml", [*short.base, *QUICK])
    assert (quick.data.num_train, quick.model.hidden, quick.data.length_median) == (128, 16, 8.0)
    classify = {v.name for v in SUITES["default"]["classify"].variants}
    assert {"single bucket+padded, bf16", "ddp bucket+padded, bf16"} <= classify
    amp = SUITES["amp"]["classify"]
    assert {v.name for v in amp.variants} == {"ddp bucket+padded", "ddp bucket+padded, bf16",
                                              "single bucket+padded", "single bucket+padded, bf16"}
    assert amp.baseline == "ddp bucket+padded" and amp.base == SUITES["default"]["classify"].base
    metrics = tmp_path / "run" / "metrics.jsonl"
    cmd = command(byname["minimal no sync"], ["--config", "c.yaml", "data.num_train=8"], metrics)
    assert "--nproc_per_node=2" in cmd or any(a.startswith("--nproc_per_node=") for a in cmd)
    assert cmd[cmd.index("-m", cmd.index("torch.distributed.run") + 1) + 1:] == [
        "ddp_seq.bench.minimal", "--sync", "none", "--out", str(metrics), "--config", "c.yaml", "data.num_train=8"]
    one = command(Variant("m", "minimal", 1, setup="ddp"), [], metrics)
    assert one[1:] == ["-m", "ddp_seq.bench.minimal", "--sync", "ddp", "--out", str(metrics)]  # no torchrun


def _short_result(rows, budget=10.0):
    variants = {name: {"tokens_per_s": tps, "final_metric": m, "metric_at_budget": m, "curve": [(budget, m)]}
                for name, (tps, m) in rows.items()}
    return {"short": {"variants": variants, "default": "ddp bucket+padded", "monitor": "val_accuracy",
                      "budget_s": budget, "baseline": "reference"}}


def test_short_targets_and_the_informational_rows():
    parts = _short_result({"reference": (10.0, 0.5), "single bucket+padded": (40.0, 0.8),
                           "ddp bucket+padded": (24.0, 0.8), "minimal no sync": (40.0, 0.3),
                           "minimal ddp": (25.0, 0.8), "single bucket+padded, bf16": (64.0, 0.79),
                           "ddp bucket+padded, bf16": (30.0, 0.8)})
    checks = {row["target"]: row for row in targets({"parts": parts})}  # a short-only result (--suite short)
    assert list(checks) == ["short: ddp 2 ranks >= 0.65x single 2 threads",
                            "short: single 2 threads >= 3x reference tokens/s",
                            "short: single bf16 >= 1.5x single fp32 (informational)",
                            "short: minimal ddp / minimal no sync (informational: one gradient all-reduce per step)",
                            "short: ddp_seq ddp >= 0.95x minimal ddp (ddp_seq's own overhead)"]
    assert checks["short: ddp 2 ranks >= 0.65x single 2 threads"]["met"] == "NO"  # 0.60x
    assert checks["short: single 2 threads >= 3x reference tokens/s"]["met"] == "yes"  # 4.0x
    bf16 = checks["short: single bf16 >= 1.5x single fp32 (informational)"]
    assert bf16["met"] == "yes" and bf16["measured"] == "1.60x; val_accuracy at 10.0s: 0.7900 vs 0.8000"
    info = checks["short: minimal ddp / minimal no sync (informational: one gradient all-reduce per step)"]
    assert info["measured"] == "0.62x" and info["met"] == "—"
    own = checks["short: ddp_seq ddp >= 0.95x minimal ddp (ddp_seq's own overhead)"]
    assert own["measured"] == "0.960x" and own["met"] == "yes"
    parts["short"]["variants"]["ddp bucket+padded"]["tokens_per_s"] = 27.0  # 0.675x single; 1.08x minimal
    parts["short"]["variants"]["single bucket+padded, bf16"]["tokens_per_s"] = 50.0  # 1.25x
    parts["short"]["variants"]["single bucket+padded, bf16"]["metric_at_budget"] = None  # not yet evaluated
    checks = {row["target"]: row for row in targets({"parts": parts})}
    assert checks["short: ddp 2 ranks >= 0.65x single 2 threads"]["met"] == "yes"
    assert checks["short: single bf16 >= 1.5x single fp32 (informational)"]["met"] == "NO"
    assert checks["short: single bf16 >= 1.5x single fp32 (informational)"]["measured"].endswith(": — vs 0.8000")
    # Rows that did not run: no check about them.
    del parts["short"]["variants"]["minimal ddp"], parts["short"]["variants"]["reference"]
    labels = [row["target"] for row in targets({"parts": parts})]
    assert labels == ["short: ddp 2 ranks >= 0.65x single 2 threads",
                      "short: single bf16 >= 1.5x single fp32 (informational)"]


def test_classify_bf16_target_beside_the_classify_targets():
    result = _part({"ddp bucket+padded": (100.0, 0.9, [(10.0, 0.9)]),
                    "ddp bucket+padded, bf16": (170.0, 0.88, [(6.0, 0.88)])})
    variants = result["parts"]["classify"]["variants"]
    variants["ddp bucket+padded"]["metric_at_budget"], variants["ddp bucket+padded, bf16"]["metric_at_budget"] = (
        0.9, 0.88)
    result["parts"]["classify"]["budget_s"] = 10.0
    checks = targets(result)
    assert [row["target"] for row in checks] == ["classify: ddp bf16 >= 1.5x ddp fp32 (informational)"]
    assert checks[0]["measured"] == "1.70x; val_accuracy at 10.0s: 0.8800 vs 0.9000" and checks[0]["met"] == "yes"
    result["parts"].update(_short_result({"single bucket+padded": (40.0, 0.8), "reference": (10.0, 0.5)}))
    assert [row["target"] for row in targets(result)] == [
        "classify: ddp bf16 >= 1.5x ddp fp32 (informational)", "short: single 2 threads >= 3x reference tokens/s"]


def test_reports_show_where_a_step_goes_for_rows_that_say_and_old_results_still_render():
    breakdown = {"step_ms": 6.5, "data_ms": 0.5, "forward_ms": 2.0, "backward_ms": 2.5, "sync_ms": 1.25,
                 "optimizer_ms": 0.2, "other_ms": 0.05, "sync_share": 0.19}
    base = {"vs_baseline": 1.0, "seq_per_s": 1.0, "epoch_s": 1.0, "padding_efficiency": 1.0,
            "straggler_ratio": 1.0, "peak_rss_mb": [100.0], "final_metric": 0.5, "metric_at_budget": 0.5,
            "curve": [(1.0, 0.5)]}
    part = {"base_overrides": ["training.epochs=2"], "monitor": "val_accuracy", "budget_s": 1.0,
            "default": "ddp bucket+padded", "baseline": "reference",
            "variants": {"reference": {**base, "tokens_per_s": 10.0},  # no breakdown keys at all (old)
                         "minimal ddp": {**base, "tokens_per_s": 30.0, **dict.fromkeys(breakdown)},  # None
                         "ddp bucket+padded": {**base, "tokens_per_s": 31.0, **breakdown}}}
    machine = {"device": "cpu", "date": "2026-12-01", "host": "h", "cores": 2, "torch": "2.13.0", "python": "3.11"}
    result = {"suite": "short", "repeats": 1, "config": "c.yaml", "command": "ddp-seq bench --suite short",
              "parts": {"short": part}, "machine": machine}
    text = render_text(result)
    assert f"short: {STEP_TITLE}" in text
    table = text[text.index(STEP_TITLE):].splitlines()
    assert table[1].split() == ["configuration", "step_ms", "data_ms", "forward_ms", "backward_ms", "sync_ms",
                                "optimizer_ms", "other_ms", "sync_share"]
    assert table[2].split() == ["ddp", "bucket+padded", "6.5000", "0.5000", "2.0000", "2.5000", "1.2500",
                                "0.2000", "0.0500", "0.1900"]
    assert not any("minimal ddp" in line or line.strip().startswith("reference") for line in table[2:4])
    markdown = render_markdown([(result, "r.json")])
    assert f"#### short: {STEP_TITLE}" in markdown
    assert "| ddp bucket+padded | 6.500 | 0.500 | 2.000 | 2.500 | 1.250 | 0.200 | 0.050 | 0.190 |" in markdown
    assert markdown.count("| minimal ddp |") == 1  # in the main table only
    # Results saved before the breakdown existed: no second table, and nothing fails.
    for name in ("2026-11-27-vm.json", "2026-11-30-library.json"):
        old = json.loads((REPO_RESULTS / name).read_text())
        assert "step_ms" not in json.dumps(old)
        assert STEP_TITLE not in render_markdown([(old, name)]) and STEP_TITLE not in render_text(old)


def test_newest_complete_full_result_per_device(tmp_path):
    def write(name, device, finished, **extra):
        result = {"suite": "default", "complete": True, "quick": False, "repeats": 3, "config": "c.yaml",
                  "command": "make bench", "parts": {}, "skipped": {},
                  "machine": {"device": device, "date": finished[:10], "finished": finished, "host": "h",
                              "cores": 2, "torch": "2.13.0", "python": "3.11"}, **extra}
        (tmp_path / name).write_text(json.dumps(result))

    write("a.json", "cpu", "2026-11-01T10:00:00")
    write("b.json", "cpu", "2026-11-02T10:00:00")
    write("c.json", "cpu", "2026-11-03T10:00:00", quick=True)  # a smoke run measures nothing
    write("d.json", "cpu", "2026-11-04T10:00:00", complete=False)  # interrupted
    write("e.json", "NVIDIA H200", "2026-10-01T10:00:00")
    (tmp_path / "broken.json").write_text("{")
    chosen = newest_per_device(tmp_path)
    assert [name for _, name in chosen] == ["b.json", "e.json"]  # CPU first, then the GPU section
    text = render_markdown(chosen)
    assert text.index("## CPU (2 cores)") < text.index("## NVIDIA H200") and "bench/results/b.json" in text


def test_render_only_regenerates_benchmarks_md_from_saved_results(tmp_path, capsys):
    from ddp_seq.bench import main

    results, markdown = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    results.mkdir()
    assert main(["--render", "--out", str(results / "x.json"), "--markdown", str(markdown)]) == 1  # nothing yet
    assert not markdown.exists()
    machine = {"device": "cpu", "date": "2026-11-27", "finished": "2026-11-27T08:00:00", "host": "h", "cores": 2,
               "torch": "2.13.0", "python": "3.11"}
    (results / "y.json").write_text(json.dumps({"suite": "default", "complete": True, "repeats": 3, "config": "c",
                                                "command": "make bench", "parts": {}, "machine": machine}))
    assert main(["--render", "--out", str(results / "x.json"), "--markdown", str(markdown)]) == 0
    assert markdown.read_text().startswith("# Benchmarks") and "bench/results/y.json" in markdown.read_text()


def test_reference_model_is_ddp_seqs_model_on_the_packed_path():
    """Same layers created in the same order: the same seed gives the same weights and outputs."""
    from ddp_seq.bench.reference import PackedLSTM, SequenceDataset, pad_collate
    from ddp_seq.nn.seq_model import SeqModel

    torch.manual_seed(3)
    ours = SeqModel("classify", 8, 4, hidden=16, layers=2, embedding_dim=12, execution="packed")
    torch.manual_seed(3)
    theirs = PackedLSTM(8, 4, per_step=False, embedding_dim=12, hidden=16, layers=2)
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))
    import numpy as np

    lengths = [5, 2, 7]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.random.default_rng(0).standard_normal((offsets[-1], 8)).astype(np.float32)
    inputs, lens, targets = pad_collate([SequenceDataset(values, offsets, np.array([0, 1, 2]), False)[i]
                                         for i in range(3)])
    assert inputs.shape == (3, 7, 8) and lens.tolist() == lengths and targets.tolist() == [0, 1, 2]
    assert torch.allclose(ours(inputs, lens), theirs(inputs, lens), atol=1e-6)


def test_execution_matrix_quick_covers_every_configuration():
    result = execution_matrix(repeats=1, quick=True)
    assert len(result["variants"]) == 8  # lstm/gru x uni/bi x bucketed/random
    for name, row in result["variants"].items():
        assert row["packed_tokens_per_s"] > 0 and row["padded_tokens_per_s"] > 0, name
        assert row["padded_over_packed"] == pytest.approx(row["padded_tokens_per_s"] / row["packed_tokens_per_s"])


@pytest.mark.slow
def test_quick_default_suite_runs_every_runner_and_writes_benchmarks_md(tmp_path):
    out, markdown = tmp_path / "results" / "r.json", tmp_path / "BENCHMARKS.md"
    proc = python("-m", "ddp_seq", "bench", "--suite", "default", "--quick", "--repeats", "1", "--out", out,
                  "--markdown", markdown, timeout=400).check()
    result = json.loads(out.read_text())
    assert result["complete"] and set(result["parts"]) == {"classify", "tag", "short"}
    lightning = lightning_installed()  # make test installs the [bench] extra; without it, its rows are skipped
    plan = quick_plan(SUITES["default"])
    for name, part in result["parts"].items():
        runnable = {v.name for v in SUITES["default"][name].variants
                    if not missing(v, torch.cuda.is_available(), lightning, quick=True)}
        ran = {v.name for v in SUITES["default"][name].variants if (name, v.name) in plan}
        # --quick runs each task's baseline and default, and one row per runner x launch across the
        # suite (dp too: on a CPU it runs under --quick); the others' configs are loaded and
        # checked, and said so.
        assert set(part["variants"]) == runnable & ran and part["baseline"] == "reference"
        assert {f"{name}: {v}" for v in runnable - ran} <= set(result["config_only"]), name
        trained = set()
        for config, row in part["variants"].items():
            assert row["tokens_per_s"] > 0 and 0 < row["padding_efficiency"] <= 1, config
            assert 0 <= row["final_metric"] <= 1 and all(mb > 50 for mb in row["peak_rss_mb"]), config
            trained.add(round(row["sequences_per_epoch"]))  # every runner trains on the same data
            assert f"| {config} |" in markdown.read_text() and config in proc.stdout
        assert trained == {128}, name
        assert (out.parent / part["curves"]).stat().st_size > 1000  # the PNG
        if name != "short":  # (the short part leaves its baseline and default rows to classify's)
            ddp, reference = part["variants"]["ddp bucket+padded"], part["variants"]["reference"]
            assert ddp["padding_efficiency"] > reference["padding_efficiency"] and reference["vs_baseline"] == 1.0
            assert len(ddp["peak_rss_mb"]) == 2 and part["default"] == "ddp bucket+padded"  # one per rank
        for config, row in part["variants"].items():  # ddp_seq's runs say where a step's time went
            if config.startswith(("single", "ddp", "dp")):
                assert row["step_ms"] > 0 and row["sync_ms"] >= 0, config
            else:  # the reference, minimal and Lightning runners write no breakdown
                assert row["step_ms"] is None, config
    # dp (training.mode=dp: one process; without GPUs DataParallel only calls the module) beside ddp:
    # what --suite modes compares, here on the default task (see test_modes_suite_is_two_quick_launches).
    assert len(result["parts"]["classify"]["variants"]["dp random+packed"]["peak_rss_mb"]) == 1
    short = result["parts"]["short"]  # the minimal loop ran both ways, on 2 ranks
    assert set(short["variants"]) == {"minimal no sync", "minimal ddp"}
    assert all(len(row["peak_rss_mb"]) == 2 and row["vs_baseline"] is None for row in short["variants"].values())
    # Without its default row, the budget is the faster-finishing row's training time.
    assert short["budget_s"] == min(row["curve"][-1][0] for row in short["variants"].values())
    text = markdown.read_text()
    assert "### Targets" in text and "### Execution paths" in text and "![classify" in text
    checks = targets(result)
    # (the short part's ddp_seq and reference rows are left to the full run and to the pure tests above)
    assert {"default config >= 10x reference tokens/s", "short: minimal ddp / minimal no sync (informational: "
            "one gradient all-reduce per step)"} <= {c["target"] for c in checks}
    assert all(f"| {row['target']} | {row['measured']} | {row['met']} |" in text for row in checks)


def test_modes_suite_is_two_quick_launches_and_sums_up_without_a_default_row(tmp_path):
    """``--suite modes`` (dp beside ddp) runs no launch the default suite's --quick does not: its ddp
    row is the ddp rows' launch and its dp row the dp launch, which the slow test above trains (dp on
    the CPU too). What is its own: its rows, their configs, and a part without a default row."""
    from ddp_seq.bench.report import plot_curves
    from ddp_seq.config import load_config

    part = SUITES["modes"]["classify"]
    assert [v.name for v in part.variants] == ["ddp", "dp"] and part.baseline == "ddp"
    default_plan = quick_plan(SUITES["default"])
    quick_launches = {launch_of(v) for name, p in SUITES["default"].items() for v in p.variants
                      if (name, v.name) in default_plan}
    assert {launch_of(v) for v in part.variants} <= quick_launches
    for v in part.variants:  # both run on this machine, with or without GPUs, and their configs load
        assert missing(v, has_cuda=torch.cuda.is_available(), has_lightning=False) is None
        cfg = load_config("configs/default.yaml", [*part.base, *QUICK, *v.overrides])
        assert (cfg.training.mode, cfg.data.num_train, cfg.training.epochs) == (v.name, 128, 2)
    # No default row: the budget is the faster-finishing row's training time.
    assert default_variant(part) is None
    runs = {"ddp": [summarise([epoch(1.0, 100.0, 0.5), epoch(1.0, 100.0, 0.7)], "val_accuracy")],
            "dp": [summarise([epoch(3.0, 40.0, 0.6), epoch(3.0, 40.0, 0.9)], "val_accuracy")]}
    summary = finish_part(runs, part.baseline, default_variant(part))
    assert summary["default"] == "ddp" and summary["budget_s"] == 2.0
    assert summary["variants"]["dp"]["vs_baseline"] == pytest.approx(0.4)
    assert summary["variants"]["dp"]["metric_at_budget"] is None  # dp had not evaluated by 2 s
    result = {"suite": "modes", "repeats": 1, "parts": {"classify": {"monitor": "val_accuracy", **summary}}}
    text = render_text(result)
    assert "the training time of ddp" in text and "vs_baseline = tokens/s over ddp's" in text
    png = plot_curves(result, tmp_path / "modes.png")  # None only without matplotlib (the [bench] extra)
    assert png.stat().st_size > 1000 if png else importlib.util.find_spec("matplotlib") is None


def test_the_user_model_row_trains_the_default_network():
    """The bench's user model (model.target) must be the very network of the built-in default, or the
    row compares two models instead of two paths: same layers and order, same seed -> same weights
    and outputs."""
    from ddp_seq.bench.user_model import UserLSTM
    from ddp_seq.builders import build_seq_model
    from ddp_seq.config import ModelConfig

    torch.manual_seed(0)
    builtin = build_seq_model("classify", 8, 4, ModelConfig(execution="padded"))
    torch.manual_seed(0)
    user = UserLSTM(8, 4)
    shapes = [[(k, v.shape) for k, v in m.state_dict().items()] for m in (builtin, user)]
    assert shapes[0] == shapes[1]
    assert all(torch.equal(a, b) for a, b in zip(builtin.state_dict().values(), user.state_dict().values()))
    x, lengths = torch.randn(5, 9, 8), torch.tensor([9, 3, 5, 1, 7])
    assert torch.equal(builtin(x, lengths), user(x, lengths))
