"""``ddp-seq bench``: training configurations measured side by side, in one run, on real torchrun jobs.

Variants run in alternation (A B A B ...) and each figure is the median over repeats, because the
machine is shared and noisy: ratios measured in the same run are the headline, absolute numbers
second. Each run is an ordinary ``train.py`` job; its figures come from its ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .runlog import format_table

#: name -> (world size, overrides); world size 0 = one rank per visible GPU (2 without GPUs).
#: ``base`` overrides apply to every variant of the suite.
SUITES: dict[str, dict[str, Any]] = {
    "batching": {
        # The default task's length distribution on half its sequences: the random+packed baseline
        # alone takes ~95 s an epoch on 2 cores at this size.
        "base": ["training.epochs=3", "data.num_train=10000"],
        "variants": {
            "random+packed": (2, ["batching.strategy=random", "model.execution=packed"]),
            "random+padded": (2, ["batching.strategy=random", "model.execution=padded"]),
            "bucket+packed": (2, ["batching.strategy=bucket", "model.execution=packed"]),
            "bucket+auto": (2, ["batching.strategy=bucket", "model.execution=auto"]),
            "bucket+auto noise0.2": (2, ["batching.strategy=bucket", "model.execution=auto",
                                         "batching.padding_noise=0.2"]),
            "bucket+auto pool5": (2, ["batching.strategy=bucket", "model.execution=auto", "batching.pool=5"]),
        },
        "baseline": "random+packed",
    },
    # DistributedDataParallel (one process per GPU) beside the legacy nn.DataParallel (one process
    # driving every visible GPU) -- the comparison that matters on a GPU machine. Without GPUs
    # DataParallel only calls the module: 2 ranks x 1 thread against 1 process x all cores.
    "modes": {
        "base": ["training.epochs=3", "data.num_train=10000"],
        "variants": {
            "ddp": (0, ["training.mode=ddp"]),
            "dp": (1, ["training.mode=dp"]),
        },
        "baseline": "ddp",
    },
}

#: A few seconds a run: exercises the whole suite's code in the test suite.
QUICK = ["data.num_train=256", "data.num_val=64", "data.max_length=60", "model.hidden=16", "model.layers=1",
         "training.epochs=2", "batching.batch_size=32", "training.warmup_steps=2"]


def gpu_world_size() -> int:
    """Ranks for a variant with world size 0: one per visible GPU, 2 on a machine without GPUs."""
    import torch

    return torch.cuda.device_count() or 2


def run_once(world_size: int, overrides: list[str], root: Path, name: str, config: str) -> list[dict[str, Any]]:
    """Train one job (torchrun when ``world_size`` > 1) and return its ``metrics.jsonl`` records."""
    world_size = world_size or gpu_world_size()
    args = ["--config", config, *overrides, f"logging.root={root}", f"logging.name={name}",
            "logging.progress=none", "checkpoint.save=false"]
    if world_size > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world_size}",
               "-m", "ddp_seq", "train", *args]
    else:
        cmd = [sys.executable, "-m", "ddp_seq", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench run {name} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def summarise(records: list[dict[str, Any]], monitor: str) -> dict[str, Any]:
    """One run's figures: throughput over all epochs, balance, and the monitored metric per epoch."""
    epochs = [r for r in records if r["kind"] == "epoch"]
    seconds = sum(r["train_s"] for r in epochs)
    real_tokens = sum(r["tokens_per_s"] * r["train_s"] for r in epochs)
    elapsed, curve = 0.0, []
    for r in epochs:
        elapsed += r["train_s"]
        curve.append((elapsed, r[monitor]))
    return {"tokens_per_s": real_tokens / seconds, "seq_per_s": statistics.mean(r["seq_per_s"] for r in epochs),
            "epoch_s": seconds / len(epochs),
            "padding_efficiency": statistics.mean(r["padding_efficiency"] for r in epochs),
            "straggler_ratio": statistics.mean(r["straggler_ratio"] for r in epochs),
            "final_metric": epochs[-1][monitor], "curve": curve}


def metric_at(curve: list[tuple[float, float]], seconds: float) -> float | None:
    """The metric of the last evaluation reached within ``seconds`` of training (None if none was)."""
    reached = [m for t, m in curve if t <= seconds + 1e-9]
    return reached[-1] if reached else None


def run_suite(suite: str, repeats: int, quick: bool, config: str, monitor: str = "val_accuracy") -> dict[str, Any]:
    """Run every variant ``repeats`` times in alternation; return per-variant medians and ratios."""
    spec = SUITES[suite]
    base = spec["base"] + (QUICK if quick else [])
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in spec["variants"]}
    with tempfile.TemporaryDirectory(prefix="ddp-seq-bench-") as tmp:
        for rep in range(repeats):
            for name, (world_size, overrides) in spec["variants"].items():
                run_name = f"{name.replace('+', '_').replace(' ', '_')}-{rep}"
                records = run_once(world_size, base + overrides, Path(tmp), run_name, config)
                runs[name].append(summarise(records, monitor))
                print(f"  {name} #{rep + 1}: {runs[name][-1]['tokens_per_s']:,.0f} tok/s, "
                      f"{monitor} {runs[name][-1]['final_metric']:.4f}", flush=True)
    rows = {}
    for name, results in runs.items():
        row = {k: statistics.median(r[k] for r in results) for k in results[0] if k != "curve"}
        row["curve"] = results[len(results) // 2]["curve"]
        rows[name] = row
    budget = min(row["curve"][-1][0] for row in rows.values())  # the fastest variant's total time
    baseline = rows[spec["baseline"]]["tokens_per_s"]
    for row in rows.values():
        row["speedup"] = row["tokens_per_s"] / baseline
        row["metric_at_budget"] = metric_at(row["curve"], budget)
    return {"suite": suite, "monitor": monitor, "repeats": repeats, "quick": quick, "base_overrides": base,
            "budget_s": budget, "baseline": spec["baseline"], "variants": rows, "machine": machine()}


def execution_matrix(repeats: int = 3, quick: bool = False) -> dict[str, Any]:
    """Packed vs padded forward+backward of SeqModel (2 layers, hidden 128) on one thread, for every
    cell and direction, on length-bucketed and on random batches: what ``model.execution=auto``
    is chosen from. Alternates the two paths; medians of ``repeats``."""
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = _execution_rows(repeats, quick, rng=np.random.default_rng(0))
    finally:
        torch.set_num_threads(threads)
    return {"suite": "execution", "repeats": repeats, "quick": quick, "variants": rows, "machine": machine()}


def _execution_rows(repeats: int, quick: bool, rng) -> dict[str, dict[str, float]]:
    import numpy as np
    import torch

    from .config import ModelConfig
    from .model import SeqModel

    hidden, batches, batch_size = (16, 2, 8) if quick else (128, 6, 32)

    def make_batch(bucketed: bool):
        lengths = np.clip(rng.lognormal(np.log(45), 0.8, batch_size), 1, 400).astype(np.int64)
        if bucketed:  # a bucketed batch: lengths within a few steps of each other
            lengths = np.full(batch_size, int(np.median(lengths))) + rng.integers(0, 3, batch_size)
        return torch.randn(batch_size, int(lengths.max()), 8), torch.from_numpy(lengths)

    rows = {}
    for cell in ("lstm", "gru"):
        for bidirectional in (False, True):
            for bucketed in (True, False):
                data = [make_batch(bucketed) for _ in range(batches)]
                tokens = sum(int(lengths.sum()) for _, lengths in data)
                speed: dict[str, list[float]] = {"packed": [], "padded": []}
                for _ in range(repeats):
                    for execution in speed:
                        torch.manual_seed(0)
                        cfg = ModelConfig(cell=cell, hidden=hidden, layers=2, bidirectional=bidirectional)
                        model = SeqModel("classify", 8, 4, cfg, execution=execution)
                        start = time.perf_counter()
                        for x, lengths in data:
                            model(x, lengths).sum().backward()
                        speed[execution].append(tokens / (time.perf_counter() - start))
                name = f"{cell} {'bi' if bidirectional else 'uni'} {'bucket' if bucketed else 'random'}"
                packed, padded = statistics.median(speed["packed"]), statistics.median(speed["padded"])
                rows[name] = {"packed_tokens_per_s": packed, "padded_tokens_per_s": padded,
                              "padded_over_packed": padded / packed}
    return rows


def machine() -> dict[str, Any]:
    import torch

    return {"host": platform.node(), "cores": os.cpu_count(), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "date": time.strftime("%Y-%m-%d")}


def render(result: dict[str, Any]) -> str:
    """The suite's result as a text table."""
    monitor = result["monitor"]
    rows = [{"variant": name, **{k: v for k, v in row.items() if k != "curve"}}
            for name, row in result["variants"].items()]
    columns = ["variant", "tokens_per_s", "speedup", "seq_per_s", "epoch_s", "padding_efficiency",
               "straggler_ratio", "final_metric", "metric_at_budget"]
    return (f"suite {result['suite']} ({result['repeats']} alternating repeats, medians; {monitor} after the "
            f"fixed epochs and at the fastest variant's total time, {result['budget_s']:.1f}s)\n"
            + format_table(rows, columns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp-seq bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="batching", choices=sorted([*SUITES, "execution"]))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs, measures nothing")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", default=None, help="write the result as JSON to this file")
    args = parser.parse_args(argv)
    if args.suite == "execution":
        result = execution_matrix(args.repeats, args.quick)
        print(format_table([{"configuration": k, **v} for k, v in result["variants"].items()],
                           ["configuration", "packed_tokens_per_s", "padded_tokens_per_s", "padded_over_packed"]))
    else:
        result = run_suite(args.suite, args.repeats, args.quick, args.config)
        print(render(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
