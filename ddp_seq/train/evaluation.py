"""Exact evaluation: every sample of a dataset counted once, whatever the world size."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ddp_seq.config import Config
from ddp_seq.parallel.process_group import DistInfo, all_reduce_sum
from ddp_seq.train.amp import autocast, resolve_amp
from ddp_seq.train.loaders import make_loader, make_sampler
from ddp_seq.train.objective import Objective, TaskObjective


@torch.no_grad()
def evaluate(module: torch.nn.Module, data, cfg: Config, info: DistInfo, objective: Objective | None = None,
             loader: DataLoader | None = None) -> dict[str, float | list]:
    """Metrics over every sample of ``data`` exactly once, whatever the world size.

    ``{metric: float}`` for the objective's metrics; the built-in classify and tag objectives add
    per-class lists (``objective.PER_CLASS``: precision, recall, f1, support by class id, and the
    confusion matrix), all from one all-reduce.

    Each rank evaluates its shares of length-sorted global batches (filler samples weigh 0);
    the sums and counts are all-reduced and divided once. Under DDP, pass the unwrapped module:
    evaluation needs no gradient synchronisation, and ranks may see different numbers of real
    samples. In dp mode the DataParallel wrapper may be passed (batches come from ``collate_dp``).
    ``objective``: default the built-in one of ``data.task``; ``loader``: one made by
    :func:`make_loader` over an evaluation sampler (made here when not given).
    """
    objective = objective or TaskObjective(cfg.data.task)
    loader = loader or make_loader(data, make_sampler(data, cfg, info, train=False), cfg)
    amp = resolve_amp(cfg.training.amp, info.device)  # once, not per batch
    was_training = module.training
    module.eval()
    sums = None
    for batch in loader:
        batch = batch.to(info.device)
        with autocast(info.device, amp):
            outputs = module(batch.inputs, batch.model_lengths)
        part = objective.metric_sums(outputs, batch)  # stays on the device: no sync per batch
        sums = part if sums is None else sums + part
    module.train(was_training)
    return objective.finalize(all_reduce_sum(sums, info))
