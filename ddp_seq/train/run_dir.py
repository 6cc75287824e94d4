"""A run directory has one owner: a Trainer starts in one that holds an earlier run only when told
whether to resume it or to overwrite it.

Without that rule a script run twice with the same ``run_dir`` would mix two runs: a ``best.pt``
of the second run's epoch 2 over the first's epoch 7, both runs' records in one
``metrics.jsonl``, the first run's step checkpoints beside the second's. Lightning's answer is
``ckpt_path="last"`` to continue; ddp_seq's Trainer takes ``resume_from="last"`` (or a path) and
``overwrite=True``, and otherwise refuses before anything is written.

Nor do two jobs write into one run directory at the same time (a second job would resume from the
first's checkpoints while it still trains, and both would append to one ``metrics.jsonl``): the
job's rank 0 holds the directory's lock (:func:`lock_run_dir`) from the moment it takes the
directory until the job ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from ddp_seq.errors import UserError
from ddp_seq.parallel.process_group import DistInfo, on_rank0
from ddp_seq.train.resume import newest_valid, remove_partial_writes

#: What a run writes into its directory (removed by ``overwrite=True``; anything else stays).
RUN_FILES = ("checkpoints", "metrics.jsonl", "train.log", "tensorboard", "wandb", ".wandb-id")
#: The lock file of a run directory: who holds it, as one JSON line (empty when released cleanly).
LOCK_FILE = ".lock"
#: run directory (resolved) -> (the open lock file this process holds, what it was before: whether the
#: directory and the file existed, the file's bytes and times -- put back when a refused start releases it)
_held: dict[Path, tuple[int, tuple]] = {}


def _holder_text(raw: bytes) -> str:
    try:
        h = json.loads(raw)
        return (f"pid {h['pid']} on {h['host']}" + (f", job {h['job']}" if h.get("job") else "")
                + f", since {h['started']}: {h['command']}")
    except (ValueError, KeyError, TypeError):
        return "a process that left no details"


def lock_run_dir(run_dir: Path, key: str) -> list[str]:
    """Hold ``run_dir`` for this process until :func:`release_run_dir` or the process ends, so that
    two jobs never write into one run directory (issue 26, row 3). Returns notes to log.

    The lock is ``fcntl.flock`` on ``run_dir/.lock``: the kernel releases it when the holder exits
    in any way -- a crash or SIGKILL included -- so a lock is never left behind; the file keeps
    the holder's pid, host, job id and command while it holds it, and is emptied on a clean
    release, so a non-empty file whose lock is free tells that the last holder died. The same
    process may take a directory again (re-entrant): it already owns it.

    Raises:
        UserError: another live process holds ``run_dir`` (one line naming ``key``, the
            directory and the holder); nothing in the directory is changed.
    """
    resolved = run_dir.resolve()
    if resolved in _held:
        return []
    lock = run_dir / LOCK_FILE
    had_dir = run_dir.is_dir()
    times = (lock.stat().st_atime_ns, lock.stat().st_mtime_ns) if lock.is_file() else None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{key}: cannot create {run_dir} ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = _holder_text(os.pread(fd, 4096, 0))
        os.close(fd)
        raise UserError(f"{key}: {run_dir} is in use by another job ({holder}); wait for it to end, or "
                        "choose another run directory") from None
    previous = os.pread(fd, 4096, 0)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "job": os.environ.get("TORCHELASTIC_RUN_ID", "")
          if os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none" else os.environ.get("SLURM_JOB_ID", ""),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
    _held[resolved] = (fd, (had_dir, times, previous))
    if previous.strip():
        return [f"{run_dir}: its previous job ({_holder_text(previous)}) ended without releasing the run "
                "directory (it crashed or was killed); this job takes it over"]
    return []


@contextlib.contextmanager
def taking(run_dir: Path, key: str) -> Iterator[list[str]]:
    """Lock ``run_dir`` (:func:`lock_run_dir`) for the decisions in the block, which gets the notes to
    log; a :class:`UserError` from the block (the start is refused) releases the lock and leaves the
    directory as it was (:func:`release_run_dir` ``untouched``) -- unless this process held it
    already, when the earlier hold stands."""
    held_before = is_held(run_dir)
    notes = lock_run_dir(run_dir, key)
    try:
        yield notes
    except UserError:
        if not held_before:
            release_run_dir(run_dir, untouched=True)
        raise


def is_held(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s lock."""
    return Path(run_dir).resolve() in _held


def release_run_dir(run_dir: Path | None = None, untouched: bool = False) -> None:
    """Release ``run_dir`` (every directory this process holds when None): empty the lock file, so the
    next holder does not take the release for a crash, and unlock it.

    ``untouched``: the job was refused before it started -- put the lock file (and the directory)
    back as they were, bytes and times, or remove them where :func:`lock_run_dir` created them, so
    a refused start leaves no trace."""
    for resolved in list(_held) if run_dir is None else [Path(run_dir).resolve()]:
        fd, (had_dir, times, previous) = _held.pop(resolved, (None, (True, None, b"")))
        if fd is None:
            continue
        os.ftruncate(fd, 0)
        if untouched and times is not None:
            os.pwrite(fd, previous, 0)
        os.close(fd)  # closing the file releases the flock
        if untouched:
            lock = resolved / LOCK_FILE
            if times is None:
                lock.unlink(missing_ok=True)
                if not had_dir and not any(resolved.iterdir()):
                    resolved.rmdir()
            else:
                os.utime(lock, ns=times)


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
    if resume_from is not None and overwrite:
        raise UserError("Trainer: resume_from and overwrite=True contradict each other; pass one of them")
    with taking(run_dir, "Trainer: run_dir") as notes:
        return _decide_held(run_dir, resume_from, overwrite, notes)


def _decide_held(run_dir: Path, resume_from: Path | str | None, overwrite: bool,
                 notes: list[str]) -> tuple[str | None, list[str]]:
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
