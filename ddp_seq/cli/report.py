"""``ddp-seq report RUN_DIR [RUN_DIR ...]``: print the end-of-run table of runs again (see
:func:`ddp_seq.loggers.report.report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ddp_seq.errors import UserError
from ddp_seq.loggers.report import report


def main(argv: list[str] | None = None) -> int:
    """``ddp-seq report RUN_DIR [RUN_DIR ...]``: print each run's report; 2 if any could not be read."""
    parser = argparse.ArgumentParser(prog="ddp-seq report", description="print the end-of-run table of training "
                                     "runs again, from their metrics.jsonl")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path, help="run directory (logging.root/name)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    code, many = 0, len(args.run_dirs) > 1
    for i, run_dir in enumerate(args.run_dirs):
        try:
            text = report(run_dir)
        except UserError as e:
            print(f"ddp-seq: error: {e}", file=sys.stderr, flush=True)
            code = 2
            continue
        if many:
            text = ("" if i == 0 else "\n") + f"==> {run_dir} <==\n{text}"
        print(text, flush=True)
    return code
