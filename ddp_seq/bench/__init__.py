"""``ddp-seq bench``: ddp_seq measured against a hand-written reference and its peers, side by side.

``--suite default`` (``make bench``) trains the default task with the hand-written reference loop,
ddp_seq's batching x execution matrix (one process, 2 ranks, DataParallel on GPUs, bf16) and PyTorch
Lightning, a tag task, and short sequences beside a minimal data-parallel loop (``--suite short``
alone), in alternation, then writes ``bench/results/<date>-<host>.json``, a PNG of the val
metric over training time, and regenerates ``BENCHMARKS.md``. ``--quick`` runs every piece on
tiny sizes (the test suite does); it measures nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from ddp_seq.bench.execution import execution_matrix
from ddp_seq.bench.report import newest_per_device, plot_curves, render_markdown, render_text
from ddp_seq.bench.suite import QUICK, SUITES, metric_at, run_suite, summarise
from ddp_seq.fileio import write_bytes_atomic
from ddp_seq.loggers.runlog import format_table

__all__ = ["QUICK", "SUITES", "execution_matrix", "machine", "main", "metric_at", "run_suite", "summarise"]


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {"host": platform.node(), "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "gpus": torch.cuda.device_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
            "date": time.strftime("%Y-%m-%d"), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(result, indent=1).encode())


def regenerate(results_dir: Path, markdown: Path, redraw: bool = True) -> int:
    """Rewrite ``markdown`` from the newest result per device in ``results_dir`` (and, with
    ``redraw``, their curves: the PNGs follow the plotting code); how many sections."""
    results = newest_per_device(results_dir)
    for result, _ in results if redraw else ():
        for part_name, part in result["parts"].items():
            if part.get("curves"):
                plot_curves({"parts": {part_name: part}}, results_dir / part["curves"])
    if results:
        write_bytes_atomic(markdown, render_markdown(results).encode())
    return len(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp-seq bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="default", choices=sorted([*SUITES, "execution"]))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs, measures nothing")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", default=None,
                        help="result JSON (default for the full default suite: bench/results/<date>-<host>.json)")
    parser.add_argument("--markdown", default=None,
                        help="BENCHMARKS.md to regenerate (default for the full default suite: BENCHMARKS.md)")
    parser.add_argument("--render", action="store_true",
                        help="only regenerate --markdown from the results beside --out (or in bench/results)")
    args = parser.parse_args(argv)
    full_default = args.suite == "default" and not args.quick
    out = Path(args.out) if args.out else (
        Path("bench/results") / f"{time.strftime('%Y-%m-%d')}-{platform.node()}.json" if full_default else None)
    markdown = Path(args.markdown) if args.markdown else (Path("BENCHMARKS.md") if full_default else None)
    if args.render:
        sections = regenerate(out.parent if out else Path("bench/results"), markdown or Path("BENCHMARKS.md"))
        print(f"{markdown or 'BENCHMARKS.md'}: {sections} section(s)")
        return 0 if sections else 1
    if args.suite == "execution":
        result = {"suite": "execution", **execution_matrix(args.repeats, args.quick), "machine": machine()}
        print(format_table([{"configuration": k, **v} for k, v in result["variants"].items()],
                           ["configuration", "packed_tokens_per_s", "padded_tokens_per_s", "padded_over_packed"]))
    else:
        command = " ".join(["ddp-seq bench", *(argv if argv is not None else sys.argv[2:])])
        save = (lambda partial: _write_json(out, {**partial, "machine": machine()})) if out else None
        result = run_suite(args.suite, args.repeats, args.quick, args.config, on_progress=save)
        result["command"] = "make bench" if full_default and args.out is None else command
        if args.suite == "default":
            result["execution"] = execution_matrix(args.repeats, args.quick)
        result["machine"] = machine()
        if out:
            for name, part in result["parts"].items():
                png = plot_curves({"parts": {name: part}}, out.with_name(f"{out.stem}-{name}.png"))
                part["curves"] = png.name if png else None
        print(render_text(result))
    if out:
        _write_json(out, result)
        print(f"result: {out}")
    if markdown and out and args.suite == "default":
        if full_default:  # the curves were drawn above
            regenerate(out.parent, markdown, redraw=False)
        else:
            write_bytes_atomic(markdown, render_markdown([(result, out.name)]).encode())
        print(f"regenerated {markdown}")
    return 0
