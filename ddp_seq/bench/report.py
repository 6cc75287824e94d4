"""A suite's result as text, as the targets it must reach, as BENCHMARKS.md, and as curves (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddp_seq.bench.suite import (
    BREAKDOWN,
    DDP_BF16,
    DDP_ROW,
    LONG,
    MINIMAL_DDP,
    MINIMAL_NONE,
    SINGLE_BF16,
    SINGLE_ROW,
    USER_MODEL,
    metric_at,
)
from ddp_seq.loggers.runlog import format_table

COLUMNS = ["configuration", "tokens_per_s", "vs_baseline", "seq_per_s", "epoch_s", "padding_efficiency",
           "straggler_ratio", "peak_rss_mb", "final_metric", "metric_at_budget"]
#: The second table of a part: where a step's time goes, for the rows whose records say.
STEP_TITLE = "where a step's time goes (ms per step, mean over ranks)"
STEP_COLUMNS = ["configuration", *BREAKDOWN.values(), "sync_share"]
STEP_HEADERS = ["configuration", "step", "data", "forward", "backward", "sync", "optimizer", "other", "sync share"]


def _rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"configuration": name, **row,
             "peak_rss_mb": "/".join(f"{mb:.0f}" for mb in row["peak_rss_mb"])}
            for name, row in part["variants"].items()]


def _step_rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows that carry a step-time breakdown (ddp_seq's, from records that have one; results
    saved before the breakdown existed have none)."""
    return [{"configuration": name, **{c: row.get(c) for c in STEP_COLUMNS[1:]}}
            for name, row in part["variants"].items() if row.get("step_ms") is not None]


def render_text(result: dict[str, Any]) -> str:
    """Every part as a fixed-width table, then the targets."""
    out = []
    for name, part in result["parts"].items():
        out.append(f"{name} ({result['repeats']} alternating repeats, medians; {part['monitor']} after the fixed "
                   f"epochs and at {part['budget_s']:.1f}s, the training time of {part['default']}; "
                   f"vs_baseline = tokens/s over {part['baseline']}'s)")
        out.append(format_table(_rows(part), COLUMNS))
        steps = _step_rows(part)
        if steps:
            out.append(f"{name}: {STEP_TITLE}")
            out.append(format_table(steps, STEP_COLUMNS))
    for key, reason in result.get("skipped", {}).items():
        out.append(f"skipped {key}: {reason}")
    checks = targets(result)
    if checks:
        out.append(format_table(checks, ["target", "measured", "met"]))
    return "\n".join(out)


def _at_least(value: float, floor: float) -> bool:
    return value >= floor - 1e-12


class _Ratios:
    """Speed ratios between the rows of one part, and the checks they make."""

    def __init__(self, part: dict[str, Any], checks: list[dict[str, Any]]):
        self.part, self.rows, self.checks = part, part["variants"], checks

    def has(self, *names: str) -> bool:
        return set(names) <= self.rows.keys()

    def speed(self, a: str, b: str) -> float:
        """The ratio of the medians: the figure each target is judged on."""
        return self.rows[a]["tokens_per_s"] / self.rows[b]["tokens_per_s"]

    def shown(self, a: str, b: str, digits: int = 2) -> str:
        """The ratio, and beside it the ratio within each repeat (runs measured minutes apart)."""
        rows = self.rows
        paired = [x / y for x, y in zip(rows[a].get("runs_tokens_per_s", []), rows[b].get("runs_tokens_per_s", []))]
        each = f" (per repeat {' / '.join(f'{r:.{digits}f}' for r in paired)})" if len(paired) > 1 else ""
        return f"{self.speed(a, b):.{digits}f}x{each}"

    def add(self, target: str, measured: str, met: bool | None) -> None:
        """One check; ``met`` None for a figure shown for information, with no target."""
        self.checks.append({"target": target, "measured": measured,
                            "met": "—" if met is None else "yes" if met else "NO"})

    def ratio_at_least(self, target: str, a: str, b: str, floor: float, digits: int = 2) -> None:
        if self.has(a, b):
            self.add(target, self.shown(a, b, digits), _at_least(self.speed(a, b), floor))

    def bf16(self, target: str, bf16: str, fp32: str, floor: float = 1.5) -> None:
        """bf16 over fp32 tokens/s, and both rows' metric at the part's wall-clock budget (equal
        training time: the judge of whether the speed is worth its rounding)."""
        if not self.has(bf16, fp32):
            return
        at = [self.rows[name].get("metric_at_budget") for name in (bf16, fp32)]
        budget = self.part.get("budget_s")
        when = f" at {budget:.1f}s" if budget is not None else " at the budget"
        metrics = " vs ".join("—" if m is None else f"{m:.4f}" for m in at)
        self.add(target, f"{self.shown(bf16, fp32)}; {self.part.get('monitor', 'metric')}{when}: {metrics}",
                 _at_least(self.speed(bf16, fp32), floor))


#: Results that carry make gpu-check's GPU parts (``ddp-seq bench --suite gpu`` writes the same parts).
GPU_SUITES = ("gpu", "gpu-check")


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for 2 CPU cores, checked against the classify part and, when it ran, the
    short part (each check only where its rows are present, e.g. not on a GPU machine or without
    Lightning); for a GPU suite also the GPU targets (:func:`_gpu_targets`). Rows marked
    informational have a floor to read them against, not a target."""
    checks: list[dict[str, Any]] = []
    parts = result.get("parts", {})
    if "classify" in parts:
        _classify_targets(_Ratios(parts["classify"], checks))
    if "short" in parts:
        _short_targets(_Ratios(parts["short"], checks))
    if result.get("suite") in GPU_SUITES:
        _gpu_targets(parts, checks)
    return checks


def other_path(row: str) -> str:
    """The same row on the other execution path (``... bucket+packed`` <-> ``... bucket+padded``)."""
    return row.replace("+packed", "+@").replace("+padded", "+packed").replace("+@", "+padded")


def _gpu_targets(parts: dict[str, Any], checks: list[dict[str, Any]]) -> None:
    """Issue 28's GPU targets: ``execution=auto`` picks the faster path (the default row against the
    same row on the other path), and bf16 >= 1.3x fp32 at equal val metric on the larger model.
    (Single-GPU default >= 10x the reference is the classify part's first target.)"""
    for name in ("classify", "large"):
        if name not in parts:
            continue
        r = _Ratios(parts[name], checks)
        default = r.part["default"]
        r.ratio_at_least(f"{name}: execution=auto's choice ({default}) >= the other path", default,
                         other_path(default), 1.0)
    if "large" not in parts:
        return
    r = _Ratios(parts["large"], checks)
    fp32, bf16 = r.part["default"], f"{r.part['default']}, bf16"
    r.bf16("large: bf16 >= 1.3x fp32 tokens/s", bf16, fp32, floor=1.3)
    if r.has(bf16, fp32):
        ours, theirs = r.rows[bf16]["final_metric"], r.rows[fp32]["final_metric"]
        r.add(f"... at equal {r.part['monitor']} after the fixed epochs (bf16 within 0.005 of fp32)",
              f"{ours:.4f} vs {theirs:.4f}", _at_least(ours, theirs - 0.005))


def _classify_targets(r: _Ratios) -> None:
    part, rows = r.part, r.rows
    default, metric = part["default"], part["monitor"]
    if r.has(default, "reference"):
        ours, theirs = rows[default]["final_metric"], rows["reference"]["final_metric"]
        r.ratio_at_least("default config >= 10x reference tokens/s", default, "reference", 10)
        r.add(f"... at equal or better {metric} (fixed epochs)", f"{ours:.4f} vs {theirs:.4f}", _at_least(ours, theirs))
    single1, single2, ddp = "single-1thread bucket+padded", SINGLE_ROW.name, DDP_ROW.name
    r.ratio_at_least("ddp 2 ranks >= 1.85x single 1 thread", ddp, single1, 1.85)
    r.ratio_at_least("ddp 2 ranks >= 1.15x single 2 threads", ddp, single2, 1.15)
    peer, tuned = "lightning default", "lightning tuned"
    r.ratio_at_least("ddp >= 10x Lightning DDP (default setup) tokens/s", ddp, peer, 10)
    # Equal wall-clock: what the default, given more epochs, had reached when the other finished.
    long = LONG if LONG in rows else default
    for other in ("reference", peer):
        if r.has(other, long):
            other_time = rows[other]["curve"][-1][0]
            ours, theirs = metric_at(rows[long]["curve"], other_time), rows[other]["final_metric"]
            r.add(f"... {metric} at {other}'s training time ({other_time:.0f}s) >= {other}'s",
                  "—" if ours is None else f"{ours:.4f} vs {theirs:.4f}", ours is not None and _at_least(ours, theirs))
    r.ratio_at_least("a user model through the public API within 2% of the built-in path", USER_MODEL.name, ddp,
                     0.98, 3)
    r.ratio_at_least("ddp within 2% of Lightning given ddp_seq's sampler + padded path", ddp, tuned, 0.98, 3)
    r.bf16("classify: ddp bf16 >= 1.5x ddp fp32 (informational)", DDP_BF16.name, ddp)


def _short_targets(r: _Ratios) -> None:
    single, ddp = SINGLE_ROW.name, DDP_ROW.name
    r.ratio_at_least("short: ddp 2 ranks >= 0.65x single 2 threads", ddp, single, 0.65)
    r.ratio_at_least("short: single 2 threads >= 3x reference tokens/s", single, "reference", 3.0)
    r.bf16("short: single bf16 >= 1.5x single fp32 (informational)", SINGLE_BF16.name, single)
    if r.has(MINIMAL_DDP.name, MINIMAL_NONE.name):
        r.add("short: minimal ddp / minimal no sync (informational: one gradient all-reduce per step)",
              r.shown(MINIMAL_DDP.name, MINIMAL_NONE.name), None)
    r.ratio_at_least("short: ddp_seq ddp >= 0.95x minimal ddp (ddp_seq's own overhead)", ddp, MINIMAL_DDP.name,
                     0.95, 3)


def plot_curves(result: dict[str, Any], path: Path) -> Path | None:
    """Val metric over training time, one line per configuration and one panel per part (PNG).
    None when matplotlib is not installed (it comes with the ``[bench]`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    parts = result["parts"]
    fig, axes = plt.subplots(1, len(parts), figsize=(10 * len(parts), 5), squeeze=False)
    colors = plt.get_cmap("tab20").colors
    for ax, (name, part) in zip(axes[0], parts.items()):
        for i, (config, row) in enumerate(part["variants"].items()):
            xs, ys = zip(*row["curve"])
            style = {"color": "black"} if config == "reference" else {"color": colors[i % len(colors)]}
            if config.startswith("lightning"):
                style["linestyle"] = "--"
            ax.plot(xs, ys, marker="o", markersize=3, label=config,
                    linewidth=3 if config == part["default"] else 1.2, **style)
        ax.set_xscale("log")
        ax.set_xlabel("training time (s, log scale)")
        ax.set_ylabel(part["monitor"])
        ax.set_title(f"{name}: {part['monitor']} after each epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _md_table(rows: list[dict[str, Any]], columns: list[str], headers: list[str]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _machine_line(machine: dict[str, Any]) -> str:
    return (f"{machine['date']} on `{machine['host']}`: {machine['cores']} CPU cores, torch {machine['torch']}, "
            f"device {machine['device']}, Python {machine['python']}")


def section(result: dict[str, Any], json_name: str) -> str:
    """One result as a BENCHMARKS.md section: the targets, a table per task, curves, execution paths."""
    machine = result["machine"]
    title = f"CPU ({machine['cores']} cores)" if machine["device"] == "cpu" else machine["device"]
    if result.get("suite") == "gpu-check":
        title += " (`make gpu-check`)"
    out = [f"## {title}", "", _machine_line(machine) + ".", "",
           f"Reproduce: `{result['command']}` ({result['repeats']} alternating repeats; every figure is a "
           f"median). Raw result: [`bench/results/{json_name}`](bench/results/{json_name}).", ""]
    checks = targets(result)
    if checks:
        out += ["### Targets", "", _md_table(checks, ["target", "measured", "met"], ["target", "measured", "met"]), ""]
    headers = ["configuration", "real tokens/s", "× reference", "sequences/s", "epoch s", "padding eff.",
               "straggler", "peak RSS MiB per rank", "{m} after {e} epochs", "{m} at {t:.1f} s"]
    for name, part in result["parts"].items():
        epochs = [o.split("=")[1] for o in part["base_overrides"] if o.startswith("training.epochs=")][-1]
        head = [h.format(m=part["monitor"], e=epochs, t=part["budget_s"]) for h in headers]
        out += [f"### {name}", "", f"Sizes: `{' '.join(part['base_overrides'])}` over `{result['config']}`. "
                f"The last column is each configuration's metric after {part['budget_s']:.1f} s of training, the "
                f"time `{part['default']}` (the default configuration) needed for all its epochs; — means no "
                "evaluation yet.", "", _md_table(_rows(part), COLUMNS, head), ""]
        steps = _step_rows(part)
        if steps:
            out += [f"#### {name}: {STEP_TITLE}", "", _md_table(steps, STEP_COLUMNS, STEP_HEADERS), ""]
        if part.get("curves"):
            out += [f"![{name}: val metric over training time](bench/results/{part['curves']})", ""]
    execution = result.get("execution")
    if execution:
        rows = [{"configuration": k, **v} for k, v in execution["variants"].items()]
        out += [f"### Execution paths on {execution['device']} (forward + backward, 2 layers, hidden 128)", "",
                _md_table(rows, ["configuration", "packed_tokens_per_s", "padded_tokens_per_s", "padded_over_packed"],
                          ["configuration", "packed tokens/s", "padded tokens/s", "padded / packed"]), ""]
    for key, reason in result.get("skipped", {}).items():
        out.append(f"- not run: {key} ({reason})")
    if result.get("scaling"):
        out += ["", scaling_section(result["scaling"], machine)]
    return "\n".join(out).rstrip() + "\n"


def scaling_section(part: dict[str, Any], machine: dict[str, Any]) -> str:
    """make gpu-check's CPU scaling part: the default workload on 1..8 gloo ranks of one node."""
    epochs = [o.split("=")[1] for o in part["base_overrides"] if o.startswith("training.epochs=")][-1]
    head = ["configuration", "real tokens/s", f"× {part['baseline']}", "sequences/s", "epoch s", "padding eff.",
            "straggler", "peak RSS MiB per rank", f"{part['monitor']} after {epochs} epochs",
            f"{part['monitor']} at {part['budget_s']:.1f} s"]
    out = [f"## CPU scaling on {machine['cores']} cores (gloo, {machine['date']}, `{machine['host']}`)", "",
           f"The default workload (`{' '.join(part['base_overrides'])}`) on the CPU with CUDA hidden, one "
           "process or torchrun with N gloo ranks; each rank gets usable cores / N threads (the default "
           "split), so every row uses the whole machine. One run each.", "",
           _md_table(_rows(part), COLUMNS, head), ""]
    steps = _step_rows(part)
    if steps:
        out += [f"#### scaling: {STEP_TITLE}", "", _md_table(steps, STEP_COLUMNS, STEP_HEADERS), ""]
    return "\n".join(out)


INTRO = """# Benchmarks

Generated by `ddp-seq bench --suite default` (`make bench`) and by `make gpu-check` from the newest
complete result of each, per device, in `bench/results/`; do not edit by hand. Every configuration
trains the same model on the same data for the same number of epochs in its own processes, in
alternation (A B C A B C ...); each figure is the median of the repeats. Ratios measured side by
side in one run are the headline; absolute numbers depend on the machine and its load.

- **reference**: the hand-written loop (`ddp_seq/bench/reference.py`): DataLoader with random
  batches, pad in collate, pack in forward, one process using every core.
- **single / ddp / dp**: ddp_seq with 1 process (every core), 2 ranks under torchrun (1 thread each;
  one rank per GPU on a GPU machine), or the legacy DataParallel mode; each with `random` or `bucket`
  batches and `packed` or `padded` execution. `single-1thread` is one process on one thread.
- **lightning default / tuned**: PyTorch Lightning DDP with 2 processes (`ddp_seq/bench/lightning_peer.py`):
  its DistributedSampler with the reference's pad-and-pack model, or given ddp_seq's sampler and
  padded model.
- **…, bf16**: the same ddp_seq row with `training.amp=bf16` (bf16 autocast).
- **short**: short sequences (median 8 steps, hidden 256, 1 layer). **minimal no sync / minimal ddp**
  (`ddp_seq/bench/minimal.py`): a minimal hand-written loop on ddp_seq's shares, as many ranks as
  the ddp rows, without any synchronisation (the computation alone; its metric means nothing) or
  wrapped in DDP (plus one gradient all-reduce per step).
- **where a step's time goes**: ddp_seq's per-rank step breakdown (mean over epochs of the mean
  over ranks, ms per step); only rows whose records carry it.
- **real tokens/s** counts sequence steps, not padding; **padding eff.** = real / padded steps;
  **straggler** = sum over steps of the slowest rank's padded cost over the mean rank's;
  **epoch s** is training time, evaluation excluded.
- **GPU sections** (`make gpu-check`, one GPU, one run each): the reference on the GPU (cuDNN runs
  its packed LSTM) against ddp_seq's default (`ddp` is one rank on one GPU) and its batching x
  execution matrix on the default workload; a larger network (hidden 1024 x 3 layers) on both
  execution paths in fp32 and bf16; the short workload; and the machine's CPU scaling with 1, 2, 4
  and 8 gloo ranks.
- **Accuracy**: every run starts from the same seed, so repeats agree and the median hides no
  spread. Configurations that compute the same thing (packed and padded paths, 1 or 2 ranks) still
  differ by float rounding, and on a short budget that decides when a run leaves its initial
  plateau: compare them on the curves and on the longer row, not on the third decimal.
"""


def render_markdown(results: list[tuple[dict[str, Any], str]]) -> str:
    """BENCHMARKS.md from ``(result, json file name)`` pairs, one section each."""
    return INTRO + "".join("\n" + section(result, name) for result, name in results)


#: The suites BENCHMARKS.md shows: make bench's and make gpu-check's.
SHOWN_SUITES = ("default", "gpu-check")


def newest_per_device(results_dir: Path) -> list[tuple[dict[str, Any], str]]:
    """The newest complete, full-size result of each shown suite (make bench's, make gpu-check's)
    for each device, CPU first."""
    newest: dict[tuple[str, str], tuple[str, dict[str, Any], str]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if result.get("suite") not in SHOWN_SUITES or not result.get("complete") or result.get("quick"):
            continue
        key = (result["machine"]["device"], result["suite"])
        stamp = result["machine"].get("finished", result["machine"]["date"])
        if key not in newest or stamp >= newest[key][0]:
            newest[key] = (stamp, result, path.name)
    order = sorted(newest, key=lambda key: (key[0] != "cpu", key[0], SHOWN_SUITES.index(key[1])))
    return [newest[key][1:] for key in order]
