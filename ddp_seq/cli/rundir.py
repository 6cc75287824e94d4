"""Which run directory a job writes to, and which checkpoint it resumes from.

Rank 0 decides (:func:`decide_run`); every rank learns the decision (:func:`prepare_run`). A
k-fold job has one directory with a sub-directory per fold (``fold-1`` ...), each an ordinary run
directory with its own config, logs and checkpoints, decided the same way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ddp_seq.config import Config
from ddp_seq.config_text import dump_yaml
from ddp_seq.errors import UserError
from ddp_seq.parallel.process_group import on_rank0
from ddp_seq.train.run_dir import holds_run, taking

JOB_FILE = ".job"  # the torchrun rendezvous id of the job that created the run directory


def _find_job_run(root: Path, identity: str) -> str:
    """The run directory created by this same job (an earlier attempt of it), or ''."""
    if not identity or not root.is_dir():
        return ""
    for directory in sorted(root.iterdir()):
        job = directory / JOB_FILE
        if job.is_file() and job.read_text(encoding="utf-8").strip() == identity:
            return directory.name
    return ""


def choose_run_dir(cfg: Config, notes: list[str] | None = None) -> Path:
    """The run directory, locked for this job (:func:`~ddp_seq.train.run_dir.lock_run_dir`) and
    created with its ``config.yaml`` (kept from the first attempt) and job id.

    ``logging.name`` given: that directory. Empty: the directory an earlier attempt of this job
    created (torchrun restarts and Slurm requeues keep the rendezvous id), else a new
    ``<task>-<date>-<time>`` (``-2``, ``-3`` ... when taken), created with one ``mkdir`` that fails
    if it exists, so jobs started in the same second never share one. With
    ``checkpoint.resume=none`` a directory that holds a run is refused. ``notes``: what to log.
    """
    from ddp_seq.train.resume import job_identity

    root, name = Path(cfg.logging.root), cfg.logging.name
    identity = job_identity()
    name = name or _find_job_run(root, identity)
    if not name:
        name = _new_directory(root, f"{cfg.data.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = root / name
    with taking(run_dir, "logging.name") as taken:  # before anything in it is read or written
        if cfg.checkpoint.resume == "none" and holds_run(run_dir):
            raise UserError(f"logging.name: {run_dir} already holds a run; resume it with checkpoint.resume=auto "
                            "or choose another name")
        _create(run_dir, cfg, identity)
    if notes is not None:
        notes += taken
    return run_dir


def _new_directory(root: Path, stem: str) -> str:
    """Create ``root/stem`` (or ``stem-2``, ``stem-3`` ...): the first name whose ``mkdir`` succeeds,
    which is atomic -- a check for existence followed by a create is not (two jobs can pass the
    check together)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"logging.root: cannot create {root} ({e.strerror or e})") from None
    for suffix in range(1, 10_000):
        name = stem if suffix == 1 else f"{stem}-{suffix}"
        try:
            (root / name).mkdir()
            return name
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"logging.root: cannot create {root / name} ({e.strerror or e})") from None
    raise UserError(f"logging.root: {root} holds 9,999 runs named {stem}*; choose logging.name")


def _create(run_dir: Path, cfg: Config, identity: str = "") -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():  # a resumed run keeps the config it started with
            (run_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
        if identity and not (run_dir / JOB_FILE).exists():
            (run_dir / JOB_FILE).write_text(identity + "\n", encoding="utf-8")
    except OSError as e:
        raise UserError(f"logging.root: cannot create {run_dir} ({e.strerror or e})") from None


def resume_point(cfg: Config, run_dir: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume ``run_dir`` from, and notes to log.

    ``checkpoint.resume``: ``auto`` resumes from the directory's newest valid step checkpoint;
    ``none`` starts afresh; a path resumes from that file (after a torchrun restart: from the run's
    own newest checkpoint, if any).
    """
    from ddp_seq.train.resume import newest_valid, remove_partial_writes

    resume, notes = cfg.checkpoint.resume, []
    if resume == "none":
        return None, notes
    remove_partial_writes(run_dir / "checkpoints")
    # A path names where the job starts. When torchrun restarts the job's workers, the run's own
    # newer checkpoints are where it stands now; starting from the path again would redo the work.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    own = newest_valid(run_dir / "checkpoints", notes.append) if resume == "auto" or restarted else None
    if resume == "auto":
        return own, notes
    if own is not None:
        notes.append(f"restart: resuming from the run's own {own.name} rather than checkpoint.resume={resume}")
        return own, notes
    return Path(resume), notes


def decide_run(cfg: Config, fold_of: Path | None = None, fold: int = 0) -> tuple[Path, Path | None, list[str]]:
    """Rank 0's decision: the run directory, the checkpoint to resume from, and notes to log.

    ``fold_of``: the directory of a k-fold job; the run is then its sub-directory ``fold-<fold + 1>``.
    """
    from ddp_seq.train.checkpoint import check_finite, load_checkpoint

    if cfg.checkpoint.resume not in ("auto", "none"):  # a bad file is reported before anything is created
        check_finite(load_checkpoint(cfg.checkpoint.resume), cfg.checkpoint.resume)
    notes: list[str] = []
    if fold_of is None:
        run_dir = choose_run_dir(cfg, notes)
    else:
        run_dir = fold_of / f"fold-{fold + 1}"
        _create(run_dir, cfg)
    resume_from, resume_notes = resume_point(cfg, run_dir)
    return run_dir, resume_from, notes + resume_notes


def prepare_run(cfg: Config, info, fold_of: Path | None = None, fold: int = 0) -> tuple[Path, Path | None, list[str]]:
    """:func:`decide_run` on rank 0; every rank learns the decision (or the error)."""
    return on_rank0(info, lambda: decide_run(cfg, fold_of, fold))
