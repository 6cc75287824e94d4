"""Per-task losses and metrics as *sums* over this rank's samples, never as local means.

The global normalisation lives in the trainer: every rank knows the size of the whole global
batch (see ``data.batching``), so sums can be divided by the global count without asking.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.collate import IGNORE_INDEX, Batch

#: Metric names per task, in print order. ``loss`` is the training loss per sample (per token for tag).
METRICS = {"classify": ("loss", "accuracy"), "tag": ("loss", "accuracy"), "regress": ("loss", "mse", "mae")}

#: Whether a larger value of the metric is better.
HIGHER_IS_BETTER = {"loss": False, "accuracy": True, "mse": False, "mae": False}


def loss_sum(task: str, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Sum of per-sample losses (classify, regress) or per-token losses (tag), filler weighted 0."""
    if task == "classify":
        per_sample = F.cross_entropy(outputs.float(), batch.targets, reduction="none")
    elif task == "regress":
        per_sample = F.mse_loss(outputs.float(), batch.targets.float(), reduction="none")
    else:
        per_token = F.cross_entropy(outputs.float().transpose(1, 2), batch.targets,
                                    ignore_index=IGNORE_INDEX, reduction="none")  # [B, T], 0 at padding
        per_sample = per_token.sum(1)
    return (per_sample * batch.weights).sum()


def global_count(task: str, batch: Batch) -> int:
    """The denominator of the loss: sequences (or real tokens, for tag) in the whole global batch."""
    return batch.global_tokens if task == "tag" else batch.global_count


@torch.no_grad()
def metric_sums(task: str, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``[sum_1, ..., sum_k, count]`` for the task's METRICS, in float64, over real samples only.

    Sums and counts are all-reduced across ranks and divided once at the end: exact whatever the
    world size, unlike a mean of per-rank means.
    """
    w = batch.weights.double()
    loss = loss_sum(task, outputs, batch).double()
    if task == "classify":
        correct = (outputs.argmax(-1) == batch.targets).double()
        return torch.stack([loss, (correct * w).sum(), w.sum()])
    if task == "tag":
        valid = batch.mask & (batch.weights[:, None] > 0)
        correct = ((outputs.argmax(-1) == batch.targets) & valid).double().sum()
        return torch.stack([loss, correct, valid.double().sum()])
    err = outputs.double() - batch.targets.double()
    return torch.stack([loss, (err.square() * w).sum(), (err.abs() * w).sum(), w.sum()])


def finalize(task: str, sums: torch.Tensor) -> dict[str, float]:
    """Divide all-reduced sums by the all-reduced count: ``{metric: value}``."""
    count = float(sums[-1])
    return {name: float(s) / max(count, 1.0) for name, s in zip(METRICS[task], sums[:-1])}
