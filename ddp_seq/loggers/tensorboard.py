"""TensorBoard event files in the run directory (``logging.tensorboard=true``), written by rank 0 only.

Each ``metrics.jsonl`` record becomes scalars named as wandb names them
(:func:`ddp_seq.loggers.records.record_scalars`: ``train/train_loss``, ``epoch/val_accuracy``,
``epoch/padded_tokens_per_rank/rank1``, ...) at the record's ``step`` (the optimizer step). The
summary's numbers go under ``summary/...`` at the last step this process logged. Strings, None
and nested lists are left out.

A resumed run appends to the same ``<run_dir>/tensorboard/``: the resumed process opens a new
event file there, and that file starts with a restart marker (``SessionLog.START``) at the first
step it logs, so TensorBoard drops the previous process's events at that step and later (the ones
the resumed process is about to log again) and the step axis has no duplicates.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ddp_seq.errors import UserError, first_line
from ddp_seq.loggers.records import record_scalars

INSTALL = "pip install 'ddp-seq[tensorboard]'"
SUBDIR = "tensorboard"  # <run_dir>/tensorboard/


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``.

    Raises:
        UserError: the tensorboard package is missing (one line naming the pip extra), or does not load.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is absent or too old
        raise UserError(f"logging.tensorboard=true needs the tensorboard package: {INSTALL}") from None
    except Exception as e:  # noqa: BLE001 -- a broken install (protobuf versions, say): one line, not a traceback
        raise UserError(f"logging.tensorboard=true: cannot load TensorBoard's writer ({first_line(e)})") from None
    return SummaryWriter


class TensorBoardRun:
    """The event files of one run directory: ``log`` per record, ``finish`` at the end (flush, close).

    Built by :func:`start_tensorboard`. The writer is opened at the first record that has scalars,
    so a process that logs nothing (a finished run resumed) leaves no empty event file.
    """

    def __init__(self, log_dir: Path, writer_class: type, start_s: float = 0.0) -> None:
        self.log_dir = log_dir
        self._writer_class = writer_class
        self.start_s = start_s  # seconds importing TensorBoard's writer took
        self.writer: Any = None
        self.last_step: int | None = None  # the step of this process's last train/epoch record
        self.records = 0
        self.log_s = 0.0

    def cost(self) -> str:
        """What TensorBoard cost this process so far, for the end-of-run log."""
        return (f"tensorboard: {self.records} records to {self.log_dir}; {self.start_s:.2f}s to load the writer, "
                f"{self.log_s:.3f}s in logging calls")

    def log(self, record: dict[str, Any]) -> None:
        """Write the scalars of one ``metrics.jsonl`` record (see the module docstring)."""
        start = time.perf_counter()
        kind = record.get("kind")
        if kind == "summary":
            # No step of its own: shown at the end of what this process trained; a process that
            # trained nothing (the run had finished) adds nothing -- the earlier one wrote it.
            step, prefix = self.last_step, "summary/"
        else:
            step, prefix = record.get("step"), ""
        values = record_scalars(record)
        if step is None or not values:
            return
        writer = self._open(int(step))
        for name, value in values.items():
            writer.add_scalar(prefix + name, value, global_step=int(step))
        if kind != "summary":
            self.last_step = int(step)
        if kind != "train":  # an epoch's end and the summary reach the disk now, not in 2 minutes
            writer.flush()
        self.log_s += time.perf_counter() - start
        self.records += 1

    def _open(self, step: int) -> Any:
        if self.writer is None:
            # Event files already there: this process resumes the run, so events of the earlier
            # process at this step and later are superseded (SummaryWriter writes the restart marker).
            resumed = any(self.log_dir.glob("events.out.tfevents.*"))
            self.writer = self._writer_class(str(self.log_dir), purge_step=step if resumed else None)
        return self.writer

    def finish(self, exit_code: int = 0) -> None:
        """Flush and close the event file (safe to call twice)."""
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def start_tensorboard(enabled: bool, run_dir: Path | None, is_main: bool) -> TensorBoardRun | None:
    """Rank 0's TensorBoard writer for ``<run_dir>/tensorboard/``, or None (disabled, or another rank).

    Raises:
        UserError: enabled without a run directory, or the tensorboard package is missing.
    """
    if not enabled:
        return None
    if run_dir is None:
        raise UserError(f"logging.tensorboard=true needs a run directory (the event files go into "
                        f"<run_dir>/{SUBDIR}/); pass run_dir, or set logging.tensorboard=false")
    if not is_main:
        return None
    start = time.perf_counter()
    writer_class = summary_writer_class()
    return TensorBoardRun(Path(run_dir) / SUBDIR, writer_class, time.perf_counter() - start)
