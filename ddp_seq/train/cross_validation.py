"""k-fold cross-validation of any map-style dataset and model factory: one job, k Trainers.

``cross_validate(make_model, dataset, folds=k, cfg=..., run_dir=...)`` splits ``dataset`` into
``k`` folds from ``data.seed`` alone (:func:`ddp_seq.data.folds.fold_assignment`: stratified by
class for classify, by ``groups`` when given), so the folds are the same on every rank, on any
world size and in a resumed job. Fold ``i`` trains a fresh ``make_model()`` (seeded with
``training.seed``) on every other fold and validates on fold ``i`` with the :class:`Trainer`, in
``run_dir/fold-<i>``. A finished fold leaves ``fold-<i>/result.json``; a job stopped in fold ``i``
(killed, preempted) and started again with the same arguments skips the finished folds and
resumes fold ``i`` from its newest checkpoint; a finished job started again returns its stored
result. ``run_dir/cross_validation.json`` records what the results depend on (the split, the
config's data, batching, model and training sections, the objective, the model's class and
shapes): a job that differs in any of them is refused on that ``run_dir`` (``overwrite=True``
replaces it). The result -- each fold's validation metrics at its
best epoch, their mean and standard deviation -- is returned and written to ``run_dir/folds.json``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from ddp_seq.config import Config, to_dict
from ddp_seq.data.folds import fold_assignment
from ddp_seq.data.sampler import lengths_of
from ddp_seq.errors import UserError
from ddp_seq.fileio import json_text, write_bytes_atomic
from ddp_seq.loggers.runlog import format_table
from ddp_seq.parallel.process_group import DistInfo, current_info, on_rank0, refuse_ungrouped
from ddp_seq.train.contract import item_targets
from ddp_seq.train.objective import Objective, TaskObjective, as_objective
from ddp_seq.train.resume import newest_valid, remove_partial_writes
from ddp_seq.train.run_dir import clear, holds_run, is_held, release_run_dir, taking
from ddp_seq.train.trainer import Trainer

PLAN_FILE, RESULT_FILE, FOLDS_FILE = "cross_validation.json", "result.json", "folds.json"


class FoldSubset(Subset):
    """``Subset(dataset, indices)`` that keeps the ``lengths`` (and per-item ``targets``) the sampler
    and the Trainer's checks read, read once for the whole dataset: a fold costs no pass over its items."""

    def __init__(self, dataset, indices: np.ndarray, lengths: np.ndarray, targets: np.ndarray | None) -> None:
        super().__init__(dataset, indices.tolist())
        self.lengths = lengths[indices]
        if targets is not None:
            self.targets = targets[indices]


def summarize(summaries: list[dict[str, Any]], monitor: str) -> dict[str, Any]:
    """Per-fold rows (validation metrics at each fold's best epoch) and their mean and std over folds.

    The std is the population one (``ddof=0``), as ``scikit-learn``'s ``cross_val_score(...).std()`` reads.
    """
    # scalars only: per-class lists (val_f1, val_confusion, ...) stay in each fold's metrics.jsonl
    rows = [{"fold": i + 1, "best_epoch": s["best_epoch"],
             **{k: v for k, v in s["best_metrics"].items() if isinstance(v, (int, float))}}
            for i, s in enumerate(summaries)]
    metrics = list(rows[0])[2:]
    values = {m: np.array([r[m] for r in rows], dtype=np.float64) for m in metrics}
    return {"folds": rows, "monitor": monitor, "mean": {m: float(v.mean()) for m, v in values.items()},
            "std": {m: float(v.std()) for m, v in values.items()}}


def report_lines(result: dict[str, Any], run: Path | None) -> list[str]:
    """The table and the mean +- std line printed at the end of a k-fold job."""
    rows, metrics = result["folds"], list(result["mean"])
    table = format_table(rows, ["fold", "best_epoch", *metrics])
    spread = ", ".join(f"{m} {result['mean'][m]:.4f} +- {result['std'][m]:.4f}" for m in metrics)
    where = f", runs in {run}/fold-*" if run is not None else ""
    return [f"cross-validation, {len(rows)} folds (each fold's metrics at its best {result['monitor']}){where}:",
            table, f"mean +- std over folds: {spread}"]


#: Config keys that change nothing a fold computes (how data is loaded, not which).
_NOT_RESULTS = {"data": ("num_workers", "persistent_workers", "prefetch_factor")}


def _plan(assigned: np.ndarray, folds: int, seed: int, stratified: bool, grouped: bool, cfg: Config,
          objective: Objective, model: nn.Module) -> dict[str, Any]:
    """What the job's results depend on: the split (its parameters and a digest of the assignment),
    the config sections that shape training, the objective and the model (its class and parameter
    shapes). A job started again on the same ``run_dir`` must match it, or its stored folds would
    be returned for a job that was not run."""
    digest = hashlib.sha256(assigned.astype(np.int64).tobytes()).hexdigest()[:16]
    sections = to_dict(cfg)
    config = {name: {k: v for k, v in sections[name].items() if k not in _NOT_RESULTS.get(name, ())}
              for name in ("data", "batching", "model", "training")}
    shapes = hashlib.sha256(repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()]).encode())
    return {"version": 2, "folds": folds, "seed": seed, "num_samples": len(assigned), "stratified": stratified,
            "grouped": grouped, "assignment": digest, "objective": objective.name,
            "model": f"{type(model).__module__}:{type(model).__qualname__} {shapes.hexdigest()[:12]}",
            "config": config}


def _changes(saved: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """``key old -> new`` for each entry of ``plan`` (config keys one by one) that ``saved`` differs in."""
    changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in plan.items() if k != "config" and saved.get(k) != v]
    old = saved.get("config") or {}
    for section, values in plan["config"].items():
        changed += [f"{section}.{k} {old.get(section, {}).get(k)!r} -> {v!r}" for k, v in values.items()
                    if old.get(section, {}).get(k) != v]
    return changed


def _claim(run_dir: Path, plan: dict[str, Any], overwrite: bool) -> list[dict[str, Any] | None]:
    """Rank 0: take ``run_dir`` for this job (refusing one of another plan unless ``overwrite``) and
    return the finished folds' results (None for a fold still to train)."""
    with taking(run_dir, "cross_validate: run_dir"):  # released by cross_validate when the job ends
        return _claim_held(run_dir, plan, overwrite)


def _claim_held(run_dir: Path, plan: dict[str, Any], overwrite: bool) -> list[dict[str, Any] | None]:
    plan_file = run_dir / PLAN_FILE
    if overwrite and run_dir.is_dir():
        for path in [plan_file, run_dir / FOLDS_FILE, *run_dir.glob("fold-*")]:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if plan_file.is_file():
        changed = _changes(json.loads(plan_file.read_text(encoding="utf-8")), plan)
        if changed:
            shown = ", ".join(changed[:6]) + (f", ... ({len(changed)} in all)" if len(changed) > 6 else "")
            raise UserError(f"cross_validate: {run_dir} holds a k-fold job of another split, config or model "
                            f"({shown}); its folds would not be this job's: resume it unchanged, or pass "
                            "overwrite=True or another run_dir")
    elif holds_run(run_dir):
        raise UserError(f"cross_validate: {run_dir} holds a run that is not a k-fold job of this split; pass "
                        "overwrite=True to replace it, or another run_dir")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(plan_file, (json_text(plan, indent=2) + "\n").encode("utf-8"))
    results = []
    for fold in range(plan["folds"]):
        done = run_dir / f"fold-{fold + 1}" / RESULT_FILE
        results.append(json.loads(done.read_text(encoding="utf-8")) if done.is_file() else None)
    return results


def _fold_start(fold_dir: Path) -> str | None:
    """Rank 0: the checkpoint a fold that has not finished resumes from -- its newest valid one; with
    none, the files of its own earlier attempt (if any) are removed and the fold starts anew."""
    remove_partial_writes(fold_dir / "checkpoints")
    found = newest_valid(fold_dir / "checkpoints", lambda line: None)
    if found is not None:
        return str(found)
    clear(fold_dir)
    return None


def cross_validate(make_model: Callable[[], nn.Module], dataset, folds: int = 5, cfg: Config | None = None,
                   objective: str | Objective | Callable | None = None, run_dir: Path | str | None = None, *,
                   groups=None, stratify: bool | None = None, info: DistInfo | None = None, overwrite: bool = False,
                   make_logger: Callable[[Path | None, int], Any] | None = None,
                   checkpoint_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train and validate ``folds`` models, each on all folds but one; every rank calls it alike.

    Args:
        make_model: builds a fresh model (called once per fold, after ``torch.manual_seed(training.seed)``).
        dataset: a map-style dataset of ``(sequence, target)`` items (see :class:`Trainer`).
        folds: k >= 2.
        cfg: the Trainer's config; ``data.seed`` fixes the folds, ``training.seed`` the initial weights.
        objective: as for :class:`Trainer` (default ``data.task``).
        run_dir: where ``fold-<i>/`` runs, ``folds.json`` and the split's plan go; None: no files
            (and no resuming).
        groups: a group id per item (``[N]``): each group stays in one fold.
        stratify: split class by class (default: for the classify objective).
        info: this process's place in the job (default the current process group).
        overwrite: replace a ``run_dir`` that holds another job instead of refusing it.
        make_logger: ``make_logger(fold_dir, fold)`` gives each fold's logger (closed after the
            fold); default the Trainer's own.
        checkpoint_extra: stored in every fold's checkpoints, as the Trainer's (``fold`` is added).

    Returns:
        ``{"folds": [{"fold", "best_epoch", "val_<metric>", ...}], "monitor", "mean": {...},
        "std": {...}}`` -- each fold's scalar validation metrics at its best epoch, and their mean and
        population standard deviation over the folds.

    Raises:
        UserError: before any fold trains: too few items or groups for ``folds``, a ``run_dir``
            holding another job or another split; then whatever a :class:`Trainer` refuses.
    """
    cfg = cfg or Config()
    if info is None:
        refuse_ungrouped("cross_validate")
    info = info or current_info()
    run = Path(run_dir) if run_dir is not None else None
    task = as_objective(cfg.data.task if objective is None else objective)
    n = len(dataset)
    if stratify is None:
        stratify = isinstance(task, TaskObjective) and task.task == "classify" and groups is None
    # Per-item targets, read once: the stratified split and every fold's class check use them.
    classes = isinstance(task, TaskObjective) and task.task != "regress"
    targets, per_item = item_targets(dataset) if stratify or classes else (None, False)
    targets = targets if per_item else None
    if stratify and targets is None:
        raise UserError("cross_validate: stratify=True needs one class per item; split a per-step task unstratified")
    try:
        assigned = fold_assignment(n, int(folds), cfg.data.seed, targets if stratify else None,
                                   None if groups is None else np.asarray(groups))
    except ValueError as e:
        raise UserError(f"cross_validate: {e}") from None
    torch.manual_seed(cfg.training.seed)
    plan = _plan(assigned, int(folds), cfg.data.seed, bool(stratify), groups is not None, cfg, task, make_model())
    results: list = [None] * int(folds)
    # rank 0 locks run_dir in _claim for the whole job, unless its caller (the command line) holds it
    release = run is not None and info.is_main and not is_held(run)
    if run is not None:
        results = on_rank0(info, lambda: _claim(run, plan, overwrite))
    lengths = lengths_of(dataset)
    try:
        for fold in range(int(folds)):
            if results[fold] is not None:
                continue
            results[fold] = _train_fold(make_model, dataset, lengths, targets, assigned, fold, cfg, objective, run,
                                        info, make_logger, dict(checkpoint_extra or {}))
            gc.collect()  # the fold's model, optimizer and DDP wrapper go before the next are built
    finally:
        if release:
            release_run_dir(run)
    result = summarize(results, cfg.training.monitor)
    if info.is_main:
        print("\n".join(report_lines(result, run)), flush=True)
        if run is not None:
            write_bytes_atomic(run / FOLDS_FILE, (json_text(result, indent=2) + "\n").encode("utf-8"))
    return result


def _train_fold(make_model, dataset, lengths: np.ndarray, targets: np.ndarray | None, assigned: np.ndarray, fold: int,
                cfg: Config, objective, run: Path | None, info: DistInfo, make_logger,
                extra: dict[str, Any]) -> dict[str, Any]:
    """Train fold ``fold`` (resuming its own checkpoint) and return what ``summarize`` reads of it."""
    fold_dir = run / f"fold-{fold + 1}" if run is not None else None
    resume_from = None
    if fold_dir is not None:
        resume_from = on_rank0(info, lambda: _fold_start(fold_dir))
    train = FoldSubset(dataset, np.flatnonzero(assigned != fold), lengths, targets)
    val = FoldSubset(dataset, np.flatnonzero(assigned == fold), lengths, targets)
    torch.manual_seed(cfg.training.seed)  # every fold and every rank start from the same weights
    logger = make_logger(fold_dir, fold) if make_logger is not None else None
    exit_code = 1
    try:
        # claimed: this job owns fold_dir, and _fold_start decided what it resumes from
        trainer = Trainer(make_model(), train, val, cfg, objective, info=info, logger=logger, run_dir=fold_dir,
                          resume_from=resume_from, claimed=True, checkpoint_extra={**extra, "fold": fold},
                          notes=[f"cross-validation: fold {fold + 1}, {len(train)} training and {len(val)} "
                                 "validation items"])
        summary = trainer.fit()
        exit_code = 0
    finally:
        if logger is not None:
            logger.close(exit_code)
    done = {"best_epoch": summary["best_epoch"], "best_metrics": summary["best_metrics"]}
    if fold_dir is not None and info.is_main:
        write_bytes_atomic(fold_dir / RESULT_FILE, (json_text(done) + "\n").encode("utf-8"))
    return done
