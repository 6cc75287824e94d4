"""Trackers, decided once when the job starts: Weights & Biases (a run on rank 0, or one per rank,
grouped) and TensorBoard event files (rank 0 only, :mod:`ddp_seq.loggers.tensorboard`), or nothing. The
trainer never asks; it hands every record to its logger, which forwards it here.

The records are the ones written to ``metrics.jsonl``, named by one function (:func:`record_scalars`),
so wandb, TensorBoard and the files agree
(:func:`ddp_seq.loggers.records.record_scalars`).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from ddp_seq.config import Config, to_dict
from ddp_seq.errors import UserError, first_line
from ddp_seq.loggers.records import record_scalars


def wandb_mode(cfg: Config) -> str:
    """``WANDB_MODE`` from the environment wins over ``wandb.mode`` (wandb's own convention)."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower() or cfg.wandb.mode
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in ("disabled", "offline", "online"):
        raise UserError(f"WANDB_MODE={mode!r}: expected disabled, offline or online (or unset, then wandb.mode)")
    return mode


class WandbRun:
    """One wandb run: ``log`` per record, ``finish`` with the summary. Built by :func:`start_wandb`."""

    def __init__(self, run: Any, start_s: float = 0.0) -> None:
        self.run = run
        self.start_s = start_s  # seconds wandb.init took
        self.log_s = 0.0  # seconds spent in log() (wandb hands records to its own process)
        self.records = 0

    def cost(self) -> str:
        """What tracking cost this process so far, for the end-of-run log."""
        return (f"wandb: {self.records} records; {self.start_s:.2f}s to start the run, "
                f"{self.log_s:.3f}s in logging calls")

    def log(self, record: dict[str, Any]) -> None:
        start = time.perf_counter()
        self._log(record)
        self.log_s += time.perf_counter() - start
        self.records += 1

    def _log(self, record: dict[str, Any]) -> None:
        kind, step = record.get("kind"), record.get("step")
        values = record_scalars(record)
        if kind == "summary":
            self.run.summary.update(values)
        elif values:
            self.run.log(values, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def start_wandb(cfg: Config, run_dir: Path, rank: int, is_main: bool) -> WandbRun | None:
    """The wandb run of this process, or None (disabled, or not this rank's job).

    Online mode without a reachable server fails within ``wandb.init_timeout_s`` with one line
    (wandb itself would retry for about 100 s).
    """
    mode = wandb_mode(cfg)
    if mode == "disabled" or not (is_main or cfg.wandb.per_rank):
        return None
    if os.environ.get("WANDB_MODE") == "":  # set but empty means unset; wandb itself rejects it
        del os.environ["WANDB_MODE"]
    import wandb

    w = cfg.wandb
    name = w.name or run_dir.name
    group = w.group or (run_dir.name if w.per_rank else None)
    tags = [t.strip() for t in w.tags.split(",") if t.strip()]
    settings = wandb.Settings(init_timeout=w.init_timeout_s, silent=True, console="off", x_disable_stats=True)
    # A resumed job (requeue, torchrun restart, the same command again) continues the same wandb
    # run: its id is kept in the run directory, one per rank with per_rank.
    id_file = run_dir / (f".wandb-id-rank{rank}" if w.per_rank else ".wandb-id")
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    start = time.perf_counter()
    try:
        run = wandb.init(project=w.project, entity=w.entity or None, group=group, tags=tags or None,
                         name=f"{name}-rank{rank}" if w.per_rank else name, mode=mode, dir=str(run_dir),
                         config=to_dict(cfg), settings=settings, reinit="create_new", id=run_id, resume="allow")
    except Exception as e:  # noqa: BLE001 -- wandb raises CommError, UsageError, ...: one line for all
        hint = (f"; gave up after wandb.init_timeout_s={w.init_timeout_s}: check the network and WANDB_API_KEY, "
                "or use wandb.mode=offline and `wandb sync` the run directory later") if mode == "online" else ""
        raise UserError(f"wandb.mode={mode}: wandb.init failed ({first_line(e)}){hint}") from None
    id_file.write_text(run_id + "\n", encoding="utf-8")
    return WandbRun(run, time.perf_counter() - start)


class Trackers:
    """Several trackers as one (wandb and TensorBoard): each record goes to each, in order."""

    def __init__(self, trackers: list) -> None:
        self.trackers = trackers

    def cost(self) -> str:
        return "; ".join(t.cost() for t in self.trackers)

    def log(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def finish(self, exit_code: int = 0) -> None:
        """Finish every tracker, even when one of them fails (its error is raised afterwards)."""
        error: BaseException | None = None
        for tracker in self.trackers:
            try:
                tracker.finish(exit_code)
            except BaseException as e:  # noqa: BLE001 -- the others still close; re-raised below
                error = error or e
        if error is not None:
            raise error


def start_tracking(cfg: Config, run_dir: Path, rank: int, is_main: bool) -> Any:
    """This process's trackers, decided once: TensorBoard on rank 0 (``logging.tensorboard``) and
    the wandb run (:func:`start_wandb`); one object with ``log``/``finish``/``cost``, or None.

    TensorBoard is checked first: a missing package fails before wandb starts a run for nothing.

    Raises:
        UserError: the tensorboard package is missing, or wandb cannot start (nothing is left open).
    """
    from ddp_seq.loggers.tensorboard import start_tensorboard

    started: list = []
    try:
        for start in (lambda: start_tensorboard(cfg.logging.tensorboard, run_dir, is_main),
                      lambda: start_wandb(cfg, run_dir, rank, is_main)):
            tracker = start()
            if tracker is not None:
                started.append(tracker)
    except BaseException:
        Trackers(started).finish(1)
        raise
    return None if not started else started[0] if len(started) == 1 else Trackers(started)
