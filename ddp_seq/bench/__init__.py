"""``ddp-seq bench``: ddp_seq measured against a hand-written reference and its peers, side by side.

``--suite default`` (``make bench``) trains the default task with the hand-written reference loop,
ddp_seq's batching x execution matrix (one process, 2 ranks, DataParallel on GPUs, bf16) and PyTorch
Lightning, a tag task, and short sequences beside a minimal data-parallel loop (``--suite short``
alone), in alternation, then writes ``bench/results/<date>-<host>.json``, a PNG of the val
metric over training time, and regenerates ``BENCHMARKS.md``. ``--quick`` runs every piece on
tiny sizes (the test suite does); it measures nothing. ``--suite scale`` times the sampler alone at
cluster sizes (:mod:`.scale`) and appends its section to ``BENCHMARKS.md``.
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

import numpy as np

from ddp_seq.bench import scale
from ddp_seq.bench.execution import execution_matrix
from ddp_seq.bench.report import newest_per_device, plot_curves, render_markdown, render_text
from ddp_seq.bench.suite import QUICK, SUITES, metric_at, run_suite, summarise
from ddp_seq.errors import UserError
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


def newest_scale(results_dir: Path) -> tuple[dict[str, Any], str] | None:
    """The newest complete full-size ``--suite scale`` result in ``results_dir`` and its file name."""
    newest = None
    for path in sorted(results_dir.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if result.get("suite") == "scale" and result.get("complete") and not result.get("quick"):
            stamp = result["machine"]["finished"]
            if newest is None or stamp >= newest[0]:
                newest = (stamp, result, path.name)
    return newest[1:] if newest else None


def regenerate(results_dir: Path, markdown: Path, redraw: bool = True) -> int:
    """Rewrite ``markdown`` from the newest result per device in ``results_dir`` (and, with
    ``redraw``, their curves: the PNGs follow the plotting code), then the newest scale suite's
    section; how many sections."""
    results = newest_per_device(results_dir)
    for result, _ in results if redraw else ():
        for part_name, part in result["parts"].items():
            if part.get("curves"):
                plot_curves({"parts": {part_name: part}}, results_dir / part["curves"])
    scale_result = newest_scale(results_dir)
    if results or scale_result:
        text = render_markdown(results) + ("\n" + scale.markdown(*scale_result) if scale_result else "")
        write_bytes_atomic(markdown, text.encode())
    return len(results) + bool(scale_result)


def user_lengths(path: str | None, config: str) -> tuple[str, np.ndarray] | None:
    """The lengths ``[n]`` of a user's data for the scale suite: of the file ``path`` (any format the
    readers take; the format from its ending, else the config's ``data.format``), else of the
    config's training data when it is not synthetic; None for neither. Raises UserError for a file
    the readers refuse."""
    from ddp_seq.config import load_config
    from ddp_seq.data.readers.sources import SUFFIX_FORMATS, read_file, training_lengths

    if path:
        fmt = SUFFIX_FORMATS.get(Path(path).suffix.lower())
        cfg = load_config(config, [f"data.train_path={path}", *([f"data.format={fmt}"] if fmt else [])])
        if cfg.data.format == "synthetic":
            raise UserError(f"--lengths-from {path}: cannot tell its format from its name; name it in the config "
                            "(--config with data.format)")
        return Path(path).name, read_file(cfg.data, path, labelled=False)[0].data.lengths
    cfg = load_config(config)
    return None if cfg.data.format == "synthetic" else (Path(cfg.data.train_path).name, training_lengths(cfg.data))


def _scale_main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """``--suite scale``: run it, write the result JSON and the BENCHMARKS.md section (full size)."""
    user = user_lengths(args.lengths_from, args.config)
    out = Path(args.out) if args.out else (
        None if args.quick else Path("bench/results") / f"{time.strftime('%Y-%m-%d')}-{platform.node()}-scale.json")
    markdown = Path(args.markdown) if args.markdown else (None if args.quick else Path("BENCHMARKS.md"))
    result = scale.run_scale(args.quick, user)
    result["command"] = " ".join(["ddp-seq bench", *(argv if argv is not None else sys.argv[2:])])
    result["machine"] = machine()
    print(scale.text(result))
    if out:
        _write_json(out, result)
        print(f"result: {out}")
        if markdown:
            regenerate(out.parent, markdown, redraw=False) if not args.quick else write_bytes_atomic(
                markdown, scale.markdown(result, out.name).encode())
            print(f"regenerated {markdown}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ddp-seq bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="default", choices=sorted([*SUITES, "execution", "scale"]))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the suite runs, measures nothing")
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", default=None,
                        help="result JSON (default for the full default suite: bench/results/<date>-<host>.json)")
    parser.add_argument("--markdown", default=None,
                        help="BENCHMARKS.md to regenerate (default for the full default suite: BENCHMARKS.md)")
    parser.add_argument("--render", action="store_true",
                        help="only regenerate --markdown from the results beside --out (or in bench/results)")
    parser.add_argument("--lengths-from", default=None, metavar="FILE",
                        help="scale suite: also a user's lengths, from a data file the readers take")
    args = parser.parse_args(argv)
    if args.suite == "scale" and not args.render:
        try:
            return _scale_main(args, argv)
        except UserError as e:  # a data file or config the readers refuse: one line, no traceback
            print(f"ddp-seq bench: error: {e}", file=sys.stderr)
            return 2
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
