"""k-fold cross-validation (``data.folds=k``): one job trains k models in turn.

With ``data.target`` the user's training dataset is split by
:func:`~ddp_seq.train.cross_validation.cross_validate` (:func:`target_folds`). The built-in readers'
files go through :func:`train_folds`, below, because each fold encodes its own data:

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ddp_seq.config import Config
from ddp_seq.fileio import json_text, write_bytes_atomic
from ddp_seq.train.cross_validation import report_lines, summarize


def _fold_config(cfg: Config, run: Path, fold: int) -> Config:
    """``cfg`` with fold ``fold``'s wandb run named after it and grouped with the other folds."""
    w = cfg.wandb
    wandb = dataclasses.replace(w, group=w.group or run.name, name=f"{w.name or run.name}-fold-{fold + 1}")
    return dataclasses.replace(cfg, wandb=wandb)


def train_folds(cfg: Config, info, train_run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """Train the ``data.folds`` folds in turn with ``train_run`` (``cli._train_run``); return the summary."""
    from ddp_seq.cli.rundir import choose_run_dir, prepare_run
    from ddp_seq.data.readers.sources import Splits, check_folds, load_splits, read_training
    from ddp_seq.parallel.process_group import on_rank0

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
        write_bytes_atomic(run / "folds.json", (json_text(result, indent=2) + "\n").encode("utf-8"))
    return result


def target_folds(cfg: Config, info, start_logger: Callable[[Config, Path], Any]) -> dict[str, Any]:
    """``data.folds`` with ``data.target``: :func:`~ddp_seq.train.cross_validation.cross_validate` over
    the training dataset of the user's data function (its validation dataset is not used: each fold
    validates on its own part). ``start_logger(cfg, run_dir)`` makes a fold's logger, as for one run."""
    from ddp_seq.builders import build_data, build_model, probe
    from ddp_seq.cli.rundir import choose_run_dir
    from ddp_seq.parallel.process_group import on_rank0
    from ddp_seq.train.cross_validation import cross_validate

    data = build_data(cfg)
    torch.manual_seed(cfg.training.seed)
    probe(build_model(cfg, data, info.device), data, cfg, info.device)  # before any directory is made
    run = on_rank0(info, lambda: choose_run_dir(cfg))

    def fold_logger(fold_dir: Path, fold: int):
        return start_logger(_fold_config(cfg, run, fold), fold_dir)

    data.notes.append(f"data.folds={cfg.data.folds}: k-fold over the {len(data.train)} training items of "
                      f"{cfg.data.target} (its validation dataset is not used)")
    if info.is_main:
        print("\n".join(data.notes), flush=True)
    return cross_validate(lambda: build_model(cfg, data, info.device), data.train, cfg.data.folds, cfg, run_dir=run,
                          info=info, make_logger=fold_logger,
                          checkpoint_extra={"data_from_config": True, "vocab_size": data.vocab_size,
                                            "num_inputs": data.num_inputs, "num_outputs": data.num_outputs})
