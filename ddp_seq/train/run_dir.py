"""A run directory has one owner: a Trainer starts in one that holds an earlier run only when told
whether to resume it or to overwrite it.

Without that rule a script run twice with the same ``run_dir`` would mix two runs: a ``best.pt``
of the second run's epoch 2 over the first's epoch 7, both runs' records in one
``metrics.jsonl``, the first run's step checkpoints beside the second's. Lightning's answer is
``ckpt_path="last"`` to continue; ddp_seq's Trainer takes ``resume_from="last"`` (or a path) and
``overwrite=True``, and otherwise refuses before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ddp_seq.errors import UserError
from ddp_seq.parallel.process_group import DistInfo, on_rank0
from ddp_seq.train.resume import newest_valid, remove_partial_writes

#: What a run writes into its directory (removed by ``overwrite=True``; anything else stays).
RUN_FILES = ("checkpoints", "metrics.jsonl", "train.log", "tensorboard", "wandb", ".wandb-id")


def holds_run(directory: Path) -> bool:
    """A run directory counts as used once training recorded something: a checkpoint or a metric
    (in itself or in one of its folds).

    A run that failed at startup (bad device setting, say) leaves only its config and empty logs,
    and does not block its name.
    """
    metrics = directory / "metrics.jsonl"
    has_metrics = metrics.is_file() and metrics.stat().st_size > 0
    checkpoints = directory / "checkpoints"
    return has_metrics or (checkpoints.is_dir() and any(checkpoints.iterdir())) or \
        any(holds_run(fold) for fold in directory.glob("fold-*") if fold.is_dir())


def _decide(run_dir: Path, resume_from: Path | str | None, overwrite: bool) -> tuple[str | None, list[str]]:
    """Rank 0's decision: the checkpoint to resume from (as a string) and notes to log."""
    notes: list[str] = []
    if resume_from is not None and overwrite:
        raise UserError("Trainer: resume_from and overwrite=True contradict each other; pass one of them")
    if resume_from == "last":
        remove_partial_writes(run_dir / "checkpoints")
        found = newest_valid(run_dir / "checkpoints", notes.append)
        if found is not None:
            return str(found), notes
        if holds_run(run_dir):
            raise UserError(f"Trainer: resume_from='last': {run_dir} holds an earlier run but no checkpoint to resume "
                            "from (checkpoint.save was off, or none loads); pass overwrite=True to start anew there, "
                            "or another run_dir")
        notes.append(f"resume_from='last': no checkpoint in {run_dir / 'checkpoints'} yet; starting a new run")
        return None, notes
    if resume_from is not None:
        return str(resume_from), notes
    if not holds_run(run_dir):
        return None, notes
    if not overwrite:
        raise UserError(f"Trainer: run_dir {run_dir} holds an earlier run (checkpoints or metrics.jsonl); pass "
                        "resume_from='last' to continue it, overwrite=True to replace it, or another run_dir")
    clear(run_dir)
    notes.append(f"overwrite=True: removed the earlier run's {', '.join(RUN_FILES[:3])} from {run_dir}")
    return None, notes


def clear(run_dir: Path) -> None:
    """Remove what a run wrote into ``run_dir`` (:data:`RUN_FILES`); anything else there stays."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def claim(run_dir: Path | None, resume_from: Path | str | None, overwrite: bool,
          info: DistInfo) -> tuple[Path | None, list[str]]:
    """Take ``run_dir`` for a new Trainer: the checkpoint to resume from (``"last"`` resolved to the
    newest valid step checkpoint) and notes to log. Rank 0 decides, and removes an earlier run's
    files on ``overwrite``; every rank learns the decision, or raises the same error.

    Raises:
        UserError: ``run_dir`` holds an earlier run and neither ``resume_from`` nor ``overwrite``
            says what to do with it (nothing is changed), or both are given.
    """
    if run_dir is None:
        if resume_from == "last":
            raise UserError("Trainer: resume_from='last' needs a run_dir to find the newest checkpoint in")
        return (None if resume_from is None else Path(resume_from)), []
    path, notes = on_rank0(info, lambda: _decide(run_dir, resume_from, overwrite))
    return (None if path is None else Path(path)), notes
