"""A suite's result as text, as the targets it must reach, as BENCHMARKS.md, and as curves (PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..runlog import format_table
from .suite import DDP, LONG, USER_MODEL, metric_at

COLUMNS = ["configuration", "tokens_per_s", "vs_baseline", "seq_per_s", "epoch_s", "padding_efficiency",
           "straggler_ratio", "peak_rss_mb", "final_metric", "metric_at_budget"]


def _rows(part: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"configuration": name, **row,
             "peak_rss_mb": "/".join(f"{mb:.0f}" for mb in row["peak_rss_mb"])}
            for name, row in part["variants"].items()]


def render_text(result: dict[str, Any]) -> str:
    """Every part as a fixed-width table, then the targets."""
    out = []
    for name, part in result["parts"].items():
        out.append(f"{name} ({result['repeats']} alternating repeats, medians; {part['monitor']} after the fixed "
                   f"epochs and at {part['budget_s']:.1f}s, the training time of {part['default']}; "
                   f"vs_baseline = tokens/s over {part['baseline']}'s)")
        out.append(format_table(_rows(part), COLUMNS))
    for key, reason in result.get("skipped", {}).items():
        out.append(f"skipped {key}: {reason}")
    checks = targets(result)
    if checks:
        out.append(format_table(checks, ["target", "measured", "met"]))
    return "\n".join(out)


def _at_least(value: float, floor: float) -> bool:
    return value >= floor - 1e-12


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for 2 CPU cores, checked against the classify part (empty where its rows
    are missing, e.g. on a GPU machine or without Lightning)."""
    part = result.get("parts", {}).get("classify")
    if part is None:
        return []
    rows, default, checks = part["variants"], part["default"], []
    metric = part["monitor"]

    def speed(a: str, b: str) -> float:
        """The ratio of the medians: the figure each target is judged on."""
        return rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"]

    def shown(a: str, b: str, digits: int = 2) -> str:
        """The ratio, and beside it the ratio within each repeat (runs measured minutes apart)."""
        paired = [x / y for x, y in zip(rows[a].get("runs_tokens_per_s", []), rows[b].get("runs_tokens_per_s", []))]
        each = f" (per repeat {' / '.join(f'{r:.{digits}f}' for r in paired)})" if len(paired) > 1 else ""
        return f"{speed(a, b):.{digits}f}x{each}"

    def add(target: str, measured: str, met: bool) -> None:
        checks.append({"target": target, "measured": measured, "met": "yes" if met else "NO"})

    if default in rows and "reference" in rows:
        ratio = speed(default, "reference")
        ours, theirs = rows[default]["final_metric"], rows["reference"]["final_metric"]
        add("default config >= 10x reference tokens/s", shown(default, "reference"), _at_least(ratio, 10))
        add(f"... at equal or better {metric} (fixed epochs)", f"{ours:.4f} vs {theirs:.4f}", _at_least(ours, theirs))
    single1, single2, ddp = "single-1thread bucket+padded", "single bucket+padded", f"{DDP} bucket+padded"
    if {single1, ddp} <= rows.keys():
        ratio = speed(ddp, single1)
        add("ddp 2 ranks >= 1.85x single 1 thread", shown(ddp, single1), _at_least(ratio, 1.85))
    if {single2, ddp} <= rows.keys():
        ratio = speed(ddp, single2)
        add("ddp 2 ranks >= 1.15x single 2 threads", shown(ddp, single2), _at_least(ratio, 1.15))
    peer, tuned = "lightning default", "lightning tuned"
    if {peer, ddp} <= rows.keys():
        ratio = speed(ddp, peer)
        add("ddp >= 10x Lightning DDP (default setup) tokens/s", shown(ddp, peer), _at_least(ratio, 10))
    # Equal wall-clock: what the default, given more epochs, had reached when the other finished.
    long = LONG if LONG in rows else ddp
    for other in ("reference", peer):
        if {other, long} <= rows.keys():
            other_time = rows[other]["curve"][-1][0]
            ours, theirs = metric_at(rows[long]["curve"], other_time), rows[other]["final_metric"]
            add(f"... {metric} at {other}'s training time ({other_time:.0f}s) >= {other}'s",
                "—" if ours is None else f"{ours:.4f} vs {theirs:.4f}", ours is not None and _at_least(ours, theirs))
    if {USER_MODEL.name, ddp} <= rows.keys():
        ratio = speed(USER_MODEL.name, ddp)
        add("a user model through the public API within 2% of the built-in path", shown(USER_MODEL.name, ddp, 3),
            _at_least(ratio, 0.98))
    if {tuned, ddp} <= rows.keys():
        ratio = speed(ddp, tuned)
        add("ddp within 2% of Lightning given ddp_seq's sampler + padded path", shown(ddp, tuned, 3),
            _at_least(ratio, 0.98))
    return checks


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
    return "\n".join(out).rstrip() + "\n"


INTRO = """# Benchmarks

Generated by `ddp-seq bench --suite default` (`make bench`) from the newest complete result per
device in `bench/results/`; do not edit by hand. Every configuration trains the same model on the
same data for the same number of epochs in its own processes, in alternation (A B C A B C ...);
each figure is the median of the repeats. Ratios measured side by side in one run are the
headline; absolute numbers depend on the machine and its load.

- **reference**: the hand-written loop (`ddp_seq/bench/reference.py`): DataLoader with random
  batches, pad in collate, pack in forward, one process using every core.
- **single / ddp / dp**: ddp_seq with 1 process (every core), 2 ranks under torchrun (1 thread each;
  one rank per GPU on a GPU machine), or the legacy DataParallel mode; each with `random` or `bucket`
  batches and `packed` or `padded` execution. `single-1thread` is one process on one thread.
- **lightning default / tuned**: PyTorch Lightning DDP with 2 processes (`ddp_seq/bench/lightning_peer.py`):
  its DistributedSampler with the reference's pad-and-pack model, or given ddp_seq's sampler and
  padded model.
- **real tokens/s** counts sequence steps, not padding; **padding eff.** = real / padded steps;
  **straggler** = sum over steps of the slowest rank's padded cost over the mean rank's;
  **epoch s** is training time, evaluation excluded.
- **Accuracy**: every run starts from the same seed, so repeats agree and the median hides no
  spread. Configurations that compute the same thing (packed and padded paths, 1 or 2 ranks) still
  differ by float rounding, and on a short budget that decides when a run leaves its initial
  plateau: compare them on the curves and on the longer row, not on the third decimal.
"""


def render_markdown(results: list[tuple[dict[str, Any], str]]) -> str:
    """BENCHMARKS.md from ``(result, json file name)`` pairs, one section each."""
    return INTRO + "".join("\n" + section(result, name) for result, name in results)


def newest_per_device(results_dir: Path) -> list[tuple[dict[str, Any], str]]:
    """The newest complete, full-size default-suite result for each device, CPU first."""
    newest: dict[str, tuple[str, dict[str, Any], str]] = {}
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if result.get("suite") != "default" or not result.get("complete") or result.get("quick"):
            continue
        device = result["machine"]["device"]
        stamp = result["machine"].get("finished", result["machine"]["date"])
        if device not in newest or stamp >= newest[device][0]:
            newest[device] = (stamp, result, path.name)
    order = sorted(newest, key=lambda device: (device != "cpu", device))
    return [newest[device][1:] for device in order]
