"""Run directory, log lines, metrics records and progress -- rank 0's side effects, decided once.

:func:`make_logger` returns a :class:`RunLogger` on global rank 0 and a :class:`NullLogger`
everywhere else, so training code calls the logger unconditionally and never asks its rank.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from ddp_seq.fileio import json_text
from ddp_seq.loggers.tensorboard import start_tensorboard


class NullLogger:
    """The logger of every rank but 0: does nothing."""

    def info(self, message: str) -> None:
        pass

    def record(self, record: dict[str, Any]) -> None:
        pass

    def start_progress(self, total: int, description: str) -> None:
        pass

    def progress(self, steps: int, postfix: str, line: str) -> None:
        pass

    def end_progress(self) -> None:
        pass

    def close(self, exit_code: int = 0) -> None:
        pass


class TrackerLogger(NullLogger):
    """A rank other than 0 with its own wandb run (``wandb.per_rank``): records go there only."""

    def __init__(self, tracker) -> None:
        self.tracker = tracker

    def record(self, record: dict[str, Any]) -> None:
        self.tracker.log(record)

    def close(self, exit_code: int = 0) -> None:
        self.tracker.finish(exit_code)


class RunLogger(NullLogger):
    """Prints to stdout and ``train.log``, appends ``metrics.jsonl``, shows progress.

    ``progress``: ``bar`` (tqdm on stderr), ``lines`` (the periodic line is printed), ``none``, or
    ``auto`` (a bar when stderr is a terminal, lines otherwise -- e.g. in Slurm logs).
    ``run_dir`` None: the console only, no files.
    """

    def __init__(self, run_dir: Path | None, progress: str = "auto", stream: TextIO | None = None,
                 tracker=None) -> None:
        self.run_dir = run_dir
        self.tracker = tracker  # a tracking.WandbRun, or None
        self.stream = stream or sys.stdout
        if progress == "auto":
            progress = "bar" if sys.stderr.isatty() else "lines"
        self.mode = progress
        self._log = open(run_dir / "train.log", "a", encoding="utf-8") if run_dir else None
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if run_dir else None
        self._bar: tqdm | None = None

    def info(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)
        if self._log is not None:
            for line in message.splitlines() or [""]:
                self._log.write(f"{stamp} {line}\n")
            self._log.flush()

    def record(self, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.write(json_text(record) + "\n")
            self._metrics.flush()
        if self.tracker is not None:
            self.tracker.log(record)

    def start_progress(self, total: int, description: str) -> None:
        if self.mode == "bar":
            self._bar = tqdm(total=total, desc=description, leave=False, dynamic_ncols=True, file=sys.stderr)

    def progress(self, steps: int, postfix: str, line: str) -> None:
        """Advance by ``steps``; show ``postfix`` on the bar, or print ``line`` in lines mode."""
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
        elif self.mode == "lines" and line:
            self.info(line)

    def end_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self, exit_code: int = 0) -> None:
        self.end_progress()
        if self.tracker is not None:
            self.info(self.tracker.cost())
        for file in (self._log, self._metrics):
            if file is not None:
                file.close()
        if self.tracker is not None:
            self.tracker.finish(exit_code)


def make_logger(is_main: bool, run_dir: Path | None, progress: str, tracker=None) -> NullLogger:
    """A :class:`RunLogger` for the main process; for the others a :class:`TrackerLogger` when
    they have a wandb run of their own (``wandb.per_rank``), else a :class:`NullLogger`."""
    if is_main and run_dir is not None:
        return RunLogger(run_dir, progress, tracker=tracker)
    return TrackerLogger(tracker) if tracker is not None else NullLogger()


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain fixed-width text table of ``rows`` (missing values print as '-')."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
        return "-" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def default_logger(run_dir: Path | None, progress: str, tensorboard: bool, is_main: bool) -> NullLogger:
    """The Trainer's logger when it is given none: rank 0 prints (``logging.progress``) and, with a
    ``run_dir`` (created here), writes ``train.log``, ``metrics.jsonl`` and -- ``logging.tensorboard``
    -- TensorBoard event files there; the other ranks get a :class:`NullLogger` (silent)."""
    # Every rank checks the setting (a missing run_dir fails everywhere, not on rank 0 alone).
    tracker = start_tensorboard(tensorboard, run_dir, is_main)
    if not is_main:
        return NullLogger()
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
    return RunLogger(run_dir, progress, tracker=tracker)
