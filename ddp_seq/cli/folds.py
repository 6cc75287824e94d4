"""k-fold cross-validation (``data.folds=k``): one job trains k models in turn.

The training data is read once; fold ``i`` trains on every part but the i-th and validates on
the i-th (``sources.fold_indices``: deterministic from ``data.seed``). Every fold's split is
checked before the first fold trains (``sources.check_folds``): a class that some fold's training
part lacks is one error line up front, not a failure after the earlier folds have trained. Each
fold is an ordinary run -- its own vocabulary and classes (from its training part only), a fresh
model, optimizer and DDP wrapper, its own directory ``<run>/fold-<i>`` with config, logs and
checkpoints -- so an interrupted job resumes fold by fold (finished folds are not trained again).
At the end rank 0 prints each fold's validation metrics at its best epoch with their mean and
standard deviation, and writes them to ``<run>/folds.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ddp_seq.config import Config
from ddp_seq.fileio import write_bytes_atomic
from ddp_seq.loggers.runlog import format_table


def _fold_config(cfg: Config, run: Path, fold: int) -> Config:
    """``cfg`` with fold ``fold``'s wandb run named after it and grouped with the other folds."""
    w = cfg.wandb
    wandb = dataclasses.replace(w, group=w.group or run.name, name=f"{w.name or run.name}-fold-{fold + 1}")
    return dataclasses.replace(cfg, wandb=wandb)


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


def report_lines(result: dict[str, Any], run: Path) -> list[str]:
    """The table and the mean +- std line rank 0 prints at the end of a k-fold job."""
    rows, metrics = result["folds"], list(result["mean"])
    table = format_table(rows, ["fold", "best_epoch", *metrics])
    spread = ", ".join(f"{m} {result['mean'][m]:.4f} +- {result['std'][m]:.4f}" for m in metrics)
    return [f"cross-validation, {len(rows)} folds (each fold's metrics at its best {result['monitor']}), "
            f"runs in {run}/fold-*:", table, f"mean +- std over folds: {spread}"]


def train_folds(cfg: Config, info, train_run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Train the ``data.folds`` folds in turn with ``train_run`` (``cli._train_run``); return the summary."""
    from ddp_seq.cli.rundir import choose_run_dir, on_rank0, prepare_run
    from ddp_seq.data.readers.sources import Splits, check_folds, load_splits, read_training

    training = read_training(cfg.data)  # every rank reads the file once, for all folds
    # Every fold's split, then the first fold's data, before any directory: a bad file, too few
    # samples, or a class that one fold's training part lacks fails before any fold trains.
    check_folds(cfg.data, training[0], info.world_size)
    first: Splits | None = load_splits(cfg.data, 0, training)
    run = on_rank0(info, lambda: choose_run_dir(cfg))
    summaries = []
    for fold in range(cfg.data.folds):
        run_dir, resume_from, notes = prepare_run(cfg, info, fold_of=run, fold=fold)
        splits = first if fold == 0 else load_splits(cfg.data, fold, training)
        first = None
        summaries.append(train_run(_fold_config(cfg, run, fold), info, run_dir, resume_from, notes, splits, fold))
        del splits
        gc.collect()  # the previous fold's model, optimizer and DDP wrapper go before the next are built
    result = summarize(summaries, cfg.training.monitor)
    if info.is_main:
        print("\n".join(report_lines(result, run)), flush=True)
        write_bytes_atomic(run / "folds.json", (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return result
