"""Benchmark suites: which configurations run, how each run is launched, and how runs are summarised.

Every configuration is a real job in its own processes: ddp_seq's ``train`` (torchrun for more
than one rank), the hand-written :mod:`.reference` loop, the :mod:`.minimal` data-parallel loop, or
the :mod:`.lightning_peer`. All of them write epoch records in the shape of ddp_seq's
``metrics.jsonl``, so one summary fits all.
Configurations run in alternation (A B C A B C ...) and each figure is the median over repeats:
the machine is shared and noisy, so ratios measured in the same run are the headline.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: torchrun for jobs of more than one process.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@dataclass(frozen=True)
class Variant:
    """One configuration of a suite."""

    name: str
    runner: str  # ddp_seq | reference | minimal | lightning
    world_size: int = 1  # processes; 0 = one per visible GPU (2 without GPUs)
    overrides: tuple[str, ...] = ()
    setup: str = ""  # lightning: default | tuned; minimal: its --sync, none | ddp
    needs: tuple[str, ...] = ()  # cuda | gpus | cpu | lightning (see missing)


@dataclass(frozen=True)
class Part:
    """One task of a suite: its size, its configurations, and the one every ratio is taken against."""

    base: tuple[str, ...]
    variants: tuple[Variant, ...]
    baseline: str


def cells(prefix: str, world_size: int, extra: tuple[str, ...] = (), needs: tuple[str, ...] = ()) -> list[Variant]:
    """ddp_seq's batching x execution matrix: random/bucket batches, packed/padded execution."""
    return [Variant(f"{prefix} {strategy}+{execution}", "ddp_seq", world_size,
                    (*extra, f"batching.strategy={strategy}", f"model.execution={execution}"), needs=needs)
            for strategy in ("random", "bucket") for execution in ("packed", "padded")]


REFERENCE = Variant("reference", "reference")
LIGHTNING = (Variant("lightning default", "lightning", 2, setup="default", needs=("cpu", "lightning")),
             Variant("lightning tuned", "lightning", 2, ("batching.strategy=bucket",), setup="tuned",
                     needs=("cpu", "lightning")))
#: 2 ranks x 1 thread (CPU) or one rank per GPU.
DDP = "ddp"
PADDED_BUCKETS = ("batching.strategy=bucket", "model.execution=padded")
#: The default configuration trained for 4x the epochs (equal wall-clock comparisons).
LONG = f"{DDP} bucket+padded, 4x epochs"
#: The default network written as a user's own model (bench/user_model.py), through model.target.
USER_MODEL = Variant(f"{DDP} bucket+padded, user model", "ddp_seq", 0,
                     (*PADDED_BUCKETS, "model.target=ddp_seq.bench.user_model:UserLSTM"))
BF16 = "training.amp=bf16"
#: ddp_seq's bucket + padded rows, 1 process and 2 ranks, in fp32 and under bf16 autocast.
SINGLE_ROW = Variant("single bucket+padded", "ddp_seq", 1, PADDED_BUCKETS)
DDP_ROW = Variant(f"{DDP} bucket+padded", "ddp_seq", 0, PADDED_BUCKETS)
SINGLE_BF16 = Variant("single bucket+padded, bf16", "ddp_seq", 1, (*PADDED_BUCKETS, BF16))
DDP_BF16 = Variant(f"{DDP} bucket+padded, bf16", "ddp_seq", 0, (*PADDED_BUCKETS, BF16))
#: The minimal hand-written loop (bench/minimal.py) on ddp_seq's shares, as many ranks as the ddp
#: rows: without any synchronisation (the computation alone) and wrapped in DDP (plus one gradient
#: all-reduce per step).
MINIMAL_NONE = Variant("minimal no sync", "minimal", 0, setup="none")
MINIMAL_DDP = Variant(f"minimal {DDP}", "minimal", 0, setup="ddp")
#: The default task's sizes (3,000 sequences x 5 epochs).
CLASSIFY_BASE = ("data.num_train=3000", "training.epochs=5")
#: Short sequences, as in word- or sentence-level tasks (issue 16): a step is so small that the
#: collectives of 2 ranks cost as much as the computation they split. Noise 0.5 (the default 0.1
#: is learned perfectly within one epoch, so every row would tie at 1.0) keeps the accuracy at
#: equal wall-clock informative; it changes no step's cost.
SHORT = Part(("data.num_train=28800", "data.length_median=8", "data.length_sigma=0.4", "data.max_length=30",
              "data.noise=0.5", "model.hidden=256", "model.layers=1", "training.epochs=2"),
             (REFERENCE, SINGLE_ROW, DDP_ROW, MINIMAL_NONE, MINIMAL_DDP, SINGLE_BF16, DDP_BF16), "reference")

SUITES: dict[str, dict[str, Part]] = {
    # The matrix on the default task, scaled to run 3 alternating repeats in ~45 min on
    # 2 cores: 3,000 sequences x 5 epochs (235 steps of 64) is where the default config reaches
    # ~0.99 val accuracy. The tag task is smaller: the reference, the default and the peers.
    "default": {
        "classify": Part(CLASSIFY_BASE, (
            REFERENCE, *cells("single", 1), *cells(DDP, 0), SINGLE_BF16, DDP_BF16,
            Variant("single-1thread bucket+padded", "ddp_seq", 1, ("distributed.threads_per_rank=1", *PADDED_BUCKETS),
                    needs=("cpu",)),
            # The same job with IEEE denormals kept: how much of the speed the flush accounts for.
            Variant(f"{DDP} bucket+padded, denormals kept", "ddp_seq", 0,
                    (*PADDED_BUCKETS, "distributed.flush_denormal=false"), needs=("cpu",)),
            # The default given 4x the epochs: what ddp_seq reaches in the wall-clock time the
            # reference and Lightning need for their 5 epochs (the equal wall-clock comparison).
            Variant(LONG, "ddp_seq", 0, (*PADDED_BUCKETS, "training.epochs=20")), USER_MODEL,
            *cells("dp", 1, ("training.mode=dp",), needs=("gpus",)), *LIGHTNING), "reference"),
        "tag": Part(("data.task=tag", "data.num_train=1000", "training.epochs=3"), (
            REFERENCE, *[v for v in cells(DDP, 0) if v.name in (f"{DDP} random+packed", f"{DDP} bucket+padded")],
            LIGHTNING[0]), "reference"),
        "short": SHORT,
    },
    # The short workload alone (a few minutes).
    "short": {"short": SHORT},
    # bf16 autocast against fp32 on the default task, 1 process and 2 ranks.
    "amp": {"classify": Part(CLASSIFY_BASE, (DDP_ROW, DDP_BF16, SINGLE_ROW, SINGLE_BF16), DDP_ROW.name)},
    # The library path against the built-in one: the default network as a user's own model.
    "library": {"classify": Part(CLASSIFY_BASE, (DDP_ROW, USER_MODEL), DDP_ROW.name)},
    # Batching strategies and knobs on ddp_seq alone (2 ranks).
    "batching": {"classify": Part(("training.epochs=3", "data.num_train=10000"), (
        *[v for v in cells(DDP, 2) if v.name != f"{DDP} random+padded"],
        Variant("ddp bucket+auto noise0.2", "ddp_seq", 2, ("batching.padding_noise=0.2",)),
        Variant("ddp bucket+auto pool5", "ddp_seq", 2, ("batching.pool=5",))), f"{DDP} random+packed")},
    # DistributedDataParallel (one process per GPU) beside the legacy nn.DataParallel (one process
    # driving every visible GPU). Without GPUs DataParallel only calls the module: 2 ranks x 1
    # thread against 1 process x all cores.
    "modes": {"classify": Part(("training.epochs=3", "data.num_train=10000"), (
        Variant("ddp", "ddp_seq", 0, ("training.mode=ddp",)),
        Variant("dp", "ddp_seq", 1, ("training.mode=dp",))), "ddp")},
}

#: A larger network, where a GPU is not starved by a hidden state of 128 (issue 28): hidden 1024 x 3
#: layers, a smaller peak learning rate for its size, 3 epochs to fit make gpu-check's budget.
LARGE = ("model.hidden=1024", "model.layers=3", "training.lr=2e-3", "training.epochs=3")
#: ddp_seq's bucket rows on both execution paths, in fp32 and under bf16 autocast.
BUCKET_PATHS = tuple(Variant(f"{DDP} bucket+{execution}{', bf16' if amp else ''}", "ddp_seq", 0,
                             ("batching.strategy=bucket", f"model.execution={execution}", *amp))
                     for amp in ((), (BF16,)) for execution in ("packed", "padded"))
#: make gpu-check's benchmark part (``ddp-seq bench --suite gpu`` alone): on one GPU the ddp rows
#: are one process (one rank per GPU). The parts run in this order, the most wanted figures first,
#: so that a run cut short by its time cap still has them: the reference against ddp_seq's
#: batching x execution matrix on the default workload, bf16 against fp32 on the larger model, and
#: the short workload (one epoch: its 450 steps of 64 are bound by per-step overhead, not the GPU).
SUITES["gpu"] = {
    "classify": Part(CLASSIFY_BASE, (REFERENCE, *cells(DDP, 0)), "reference"),
    "large": Part((*CLASSIFY_BASE, *LARGE), BUCKET_PATHS, f"{DDP} bucket+packed"),
    "short": Part((*SHORT.base, "training.epochs=1"), (REFERENCE, *BUCKET_PATHS[:2]), "reference"),
}


def scaling_part(ranks: tuple[int, ...] = (1, 2, 4, 8)) -> Part:
    """The default workload on the CPU with 1, 2, 4, 8 gloo ranks (threads: usable cores / ranks, the
    default split), each row against one process: how ranks trade against threads on one node."""
    rows = tuple(Variant(f"{n} gloo rank{'s' if n > 1 else ''}", "ddp_seq", n,
                         ("distributed.backend=gloo", *PADDED_BUCKETS)) for n in ranks)
    # 3 of the default workload's 5 epochs: tokens/s settles after the first, and 4 launches of
    # up to 8 processes must fit make gpu-check's budget.
    return Part((*CLASSIFY_BASE, "training.epochs=3"), rows, rows[0].name)


#: CPU scaling (make gpu-check runs it with CUDA hidden, so that every rank is a CPU rank).
SUITES["scaling"] = {"scaling": scaling_part()}

#: A few seconds a run: exercises every runner and the whole summary in the test suite.
QUICK = ("data.num_train=128", "data.num_val=64", "data.max_length=60", "model.hidden=16", "model.layers=1",
         "training.epochs=2", "batching.batch_size=32", "training.warmup_steps=2")


def missing(variant: Variant, has_cuda: bool, has_lightning: bool, quick: bool = False) -> str | None:
    """Why ``variant`` cannot run on this machine, or None if it can. ``gpus``: the row runs on a CPU
    but is only worth measuring on GPUs (dp: without GPUs DataParallel only calls the module, so it
    would time the single process again); ``--quick`` measures nothing and runs it anyway."""
    cuda = None if has_cuda else "needs a CUDA GPU"
    reasons = {"cuda": cuda, "gpus": None if quick else cuda, "cpu": "CPU only" if has_cuda else None,
               "lightning": None if has_lightning else "pytorch-lightning is not installed (pip install -e .[bench])"}
    return next((reasons[need] for need in variant.needs if reasons[need]), None)


def lightning_installed() -> bool:
    return importlib.util.find_spec("pytorch_lightning") is not None


def world_size_of(variant: Variant) -> int:
    import torch

    return variant.world_size or torch.cuda.device_count() or 2


def command(variant: Variant, args: list[str], metrics: Path) -> list[str]:
    """The command line that runs ``variant`` and leaves its epoch records in ``metrics``."""
    world = world_size_of(variant)
    launch = [*TORCHRUN, f"--nproc_per_node={world}"] if world > 1 else [sys.executable]
    if variant.runner == "reference":
        return [*launch, "-m", "ddp_seq.bench.reference", "--out", str(metrics), *args]
    if variant.runner == "minimal":
        return [*launch, "-m", "ddp_seq.bench.minimal", "--sync", variant.setup, "--out", str(metrics), *args]
    if variant.runner == "lightning":
        return [*launch, "-m", "ddp_seq.bench.lightning_peer", "--setup", variant.setup, "--out", str(metrics),
                *args]
    return [*launch, "-m", "ddp_seq", "train", *args, f"logging.root={metrics.parent.parent}",
            f"logging.name={metrics.parent.name}", "logging.progress=none", "checkpoint.save=false"]


def run_once(variant: Variant, overrides: list[str], root: Path, name: str, config: str) -> list[dict[str, Any]]:
    """Run one job and return its epoch records."""
    metrics = root / name / "metrics.jsonl"
    cmd = command(variant, ["--config", config, *overrides, *variant.overrides], metrics)
    # No OMP_NUM_THREADS of ours: a single process uses every core (ddp_seq sets its threads from
    # distributed.threads_per_rank); torchrun gives each of several processes one thread.
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench run {name} failed ({proc.returncode}): {' '.join(cmd)}\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


#: Where a step's time goes: the epoch record's key (one float per rank) -> the summary's figure.
#: ddp_seq's trainer writes them; the reference, minimal and Lightning runners do not (None there).
BREAKDOWN = {"step_ms": "step_ms", "step_ms_data": "data_ms", "step_ms_forward": "forward_ms",
             "step_ms_backward": "backward_ms", "step_ms_sync": "sync_ms", "step_ms_optimizer": "optimizer_ms",
             "step_ms_other": "other_ms"}


def _rank_mean(value: Any) -> float:
    """The mean over ranks of a per-rank figure (a single number stands for every rank)."""
    return statistics.mean(value) if isinstance(value, (list, tuple)) else float(value)


def breakdown(epochs: list[dict[str, Any]]) -> dict[str, float | None]:
    """The mean over epochs of each breakdown figure's mean over ranks, and of ``sync_share``;
    None for a figure no epoch record carries (over the epochs that carry it otherwise)."""
    out: dict[str, float | None] = {}
    for key, name in [*BREAKDOWN.items(), ("sync_share", "sync_share")]:
        values = [_rank_mean(r[key]) for r in epochs if r.get(key) not in (None, [])]
        out[name] = statistics.mean(values) if values else None
    return out


def summarise(records: list[dict[str, Any]], monitor: str) -> dict[str, Any]:
    """One run's figures: throughput over all epochs, balance, memory, the monitored metric per epoch,
    and where a step's time goes when the records say (None otherwise)."""
    epochs = [r for r in records if r["kind"] == "epoch"]
    seconds = sum(r["train_s"] for r in epochs)
    real_tokens = sum(r["tokens_per_s"] * r["train_s"] for r in epochs)
    elapsed, curve = 0.0, []
    for r in epochs:
        elapsed += r["train_s"]
        curve.append((elapsed, r[monitor]))
    rss = [max(ranks) for ranks in zip(*(r.get("peak_rss_mb", [0.0]) for r in epochs))]
    return {"tokens_per_s": real_tokens / seconds, "seq_per_s": statistics.mean(r["seq_per_s"] for r in epochs),
            "epoch_s": seconds / len(epochs),
            "sequences_per_epoch": statistics.mean(r["seq_per_s"] * r["train_s"] for r in epochs),
            "padding_efficiency": statistics.mean(r["padding_efficiency"] for r in epochs),
            "straggler_ratio": statistics.mean(r["straggler_ratio"] for r in epochs),
            "final_metric": epochs[-1][monitor], "peak_rss_mb": rss, "curve": curve, **breakdown(epochs)}


def metric_at(curve: list[tuple[float, float]], seconds: float) -> float | None:
    """The metric of the last evaluation reached within ``seconds`` of training (None if none was)."""
    reached = [m for t, m in curve if t <= seconds + 1e-9]
    return reached[-1] if reached else None


def medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-figure medians over repeats (over the repeats that have the figure: None where none has,
    e.g. a step-time breakdown the runner does not write); the curve of the run with the median
    throughput."""
    keys = dict.fromkeys(k for r in results for k in r if k not in ("curve", "peak_rss_mb"))
    row: dict[str, Any] = {}
    for k in keys:
        values = [r[k] for r in results if r.get(k) is not None]
        row[k] = statistics.median(values) if values else None
    row["peak_rss_mb"] = [statistics.median(ranks) for ranks in zip(*(r["peak_rss_mb"] for r in results))]
    by_speed = sorted(results, key=lambda r: r["tokens_per_s"])
    row["curve"] = by_speed[len(by_speed) // 2]["curve"]
    row["runs_tokens_per_s"] = [r["tokens_per_s"] for r in results]
    return row


def finish_part(runs: dict[str, list[dict[str, Any]]], baseline: str, default: str | None) -> dict[str, Any]:
    """Medians per configuration, ratios to the baseline, and each one's metric at the wall-clock
    budget: the training time the default configuration (else the fastest) needed for its epochs."""
    rows = {name: medians(results) for name, results in runs.items() if results}
    if default not in rows:
        default = min(rows, key=lambda name: rows[name]["curve"][-1][0])
    budget = rows[default]["curve"][-1][0]
    base = rows[baseline]["tokens_per_s"] if baseline in rows else None
    for row in rows.values():
        row["vs_baseline"] = row["tokens_per_s"] / base if base else None
        row["metric_at_budget"] = metric_at(row["curve"], budget)
    return {"baseline": baseline, "default": default, "budget_s": budget, "variants": rows}


def default_variant(part: Part) -> str | None:
    """The row that is ddp_seq's default configuration (configs/default.yaml: ddp, bucket, auto)."""
    import torch

    from ddp_seq.nn.seq_model import resolve_execution

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"{DDP} bucket+{resolve_execution('auto', device)}"
    return name if any(v.name == name for v in part.variants) else None


def launch_of(variant: Variant) -> tuple[str, int, str, str]:
    """How a row is launched: runner, processes, setup, and ddp_seq's training.mode (dp is one process
    driving every GPU: a launch of its own, though its runner and processes are the single rows')."""
    mode = next((o.split("=", 1)[1] for o in variant.overrides if o.startswith("training.mode=")), "ddp")
    return variant.runner, variant.world_size, variant.setup, mode if variant.runner == "ddp_seq" else ""


def task_of(part: Part) -> str:
    """The part's data.task (classify unless its base overrides say otherwise)."""
    return next((o.split("=", 1)[1] for o in part.base if o.startswith("data.task=")), "classify")


def quick_plan(parts: dict[str, Part]) -> set[tuple[str, str]]:
    """``(part, row)`` pairs that ``--quick`` runs: each part's baseline and default row (its
    wall-clock budget), unless an earlier part on the same task ran that row already (the short part
    is classify on other sizes: at --quick's tiny sizes the same row again tests nothing new); then,
    across the whole suite, the first row of each runner x launch (:func:`launch_of`) not run yet.
    The other rows differ only in config overrides, which ``--quick`` loads and checks without
    training; startup dominates a tiny run, so running them too would test little and cost minutes."""
    plan, ran = set(), set()
    for name, part in parts.items():
        for row in (part.baseline, default_variant(part)):
            if row and (task_of(part), row) not in ran:
                ran.add((task_of(part), row))
                plan.add((name, row))
    launches = {launch_of(v) for name, part in parts.items() for v in part.variants if (name, v.name) in plan}
    for name, part in parts.items():
        for v in part.variants:
            if launch_of(v) not in launches:
                launches.add(launch_of(v))
                plan.add((name, v.name))
    return plan


def run_suite(suite: str, repeats: int, quick: bool, config: str,
              on_progress: Callable[[dict[str, Any]], None] | None = None,
              parts: dict[str, Part] | None = None, keep_going: bool = False) -> dict[str, Any]:
    """Run every configuration of every part ``repeats`` times in alternation. ``parts``: these
    instead of ``SUITES[suite]`` (make gpu-check's scaling part picks its rank counts).
    ``keep_going``: a run that fails is recorded under ``failed`` (its command's last output) and
    the others still run, as make gpu-check needs on a device nothing has run on yet; without it
    the first failure stops the suite."""
    import torch

    from ddp_seq.config import load_config

    has_cuda, has_lightning = torch.cuda.is_available(), lightning_installed()
    parts, skipped, plan, config_only = parts or SUITES[suite], {}, [], {}
    quick_rows = quick_plan(parts)
    for part_name, part in parts.items():
        for variant in part.variants:
            reason = missing(variant, has_cuda, has_lightning, quick)
            if reason:
                skipped[f"{part_name}: {variant.name}"] = reason
            elif quick and (part_name, variant.name) not in quick_rows:
                # --quick checks every row's config; it runs one row per runner and launch.
                load_config(config, [*part.base, *QUICK, *variant.overrides])
                config_only[f"{part_name}: {variant.name}"] = "--quick: config checked, not run"
            else:
                plan.append((part_name, variant))
    runs: dict[str, dict[str, list]] = {name: {} for name in parts}
    for part_name, variant in plan:
        runs[part_name][variant.name] = []
    overrides = {name: [*part.base, *(QUICK if quick else ())] for name, part in parts.items()}
    monitors = {name: load_config(config, overrides[name]).training.monitor for name in parts}
    result: dict[str, Any] = {"suite": suite, "repeats": repeats, "quick": quick, "config": config,
                              "skipped": skipped, "config_only": config_only, "complete": False,
                              "base_overrides": overrides, "monitors": monitors, "failed": {}}
    with tempfile.TemporaryDirectory(prefix="ddp-seq-bench-") as tmp:
        for rep in range(repeats):
            for part_name, variant in plan:
                monitor = monitors[part_name]
                run_name = f"{part_name}-{variant.name.replace('+', '_').replace(' ', '_')}-{rep}"
                try:
                    records = run_once(variant, overrides[part_name], Path(tmp), run_name, config)
                except RuntimeError as e:
                    if not keep_going:
                        raise
                    result["failed"][f"{part_name}: {variant.name}"] = str(e)[-1500:]
                    print(f"  {part_name} / {variant.name} #{rep + 1}: FAILED\n{e}", flush=True)
                    continue
                summary = summarise(records, monitor)
                runs[part_name][variant.name].append(summary)
                print(f"  {part_name} / {variant.name} #{rep + 1}: {summary['tokens_per_s']:,.0f} tok/s, "
                      f"{monitor} {summary['final_metric']:.4f}, {summary['curve'][-1][0]:.1f}s", flush=True)
                if on_progress:
                    on_progress({**result, "runs": runs})
    result["parts"] = finish_parts(parts, runs, overrides, monitors)
    result["complete"] = True
    return result


def finish_parts(parts: dict[str, Part], runs: dict[str, dict[str, list[dict[str, Any]]]],
                 overrides: dict[str, list[str]], monitors: dict[str, str]) -> dict[str, Any]:
    """Each part that has runs, summarised (:func:`finish_part`). Also what is left of a suite cut
    short: ``on_progress``'s payload carries ``runs``, ``base_overrides`` and ``monitors``, so the
    finished rows of a run killed at its time cap (make gpu-check) are not lost."""
    finished = {}
    for part_name, part in parts.items():
        done = {name: results for name, results in runs.get(part_name, {}).items() if results}
        if done:
            finished[part_name] = {"base_overrides": overrides[part_name], "monitor": monitors[part_name],
                                   **finish_part(done, part.baseline, default_variant(part))}
    return finished

