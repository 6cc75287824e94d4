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
    return finalize_sums(METRICS[task], sums)


def finalize_sums(names: tuple[str, ...], sums: torch.Tensor) -> dict[str, float]:
    """``{name: sum / count}`` for ``sums = [sum_1, ..., sum_k, count]``."""
    count = float(sums[-1])
    return {name: float(s) / max(count, 1.0) for name, s in zip(names, sums[:-1])}


class Objective:
    """What a model's outputs are trained and evaluated against.

    ``loss`` returns a *sum* over this rank's samples and the count it is a sum over (this rank's);
    the trainer divides the sum over all ranks by the count over all ranks (``Trainer.train_step``).
    When :meth:`global_count` can tell the whole global batch's count from the batch plan alone,
    no collective is needed for it.
    """

    name = "objective"
    metrics: tuple[str, ...] = ("loss",)

    def loss(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, float | torch.Tensor]:
        """``(loss sum over this rank's samples, count of this rank's samples it sums over)``."""
        raise NotImplementedError

    def global_count(self, batch: Batch) -> float | None:
        """The count over the whole global batch if known without asking the other ranks, else None."""
        return None

    @torch.no_grad()
    def metric_sums(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``[sum_1, ..., sum_k, count]`` for :attr:`metrics`, float64, over real samples only."""
        total, count = self.loss(outputs, batch)
        return torch.stack([total.double(), torch.as_tensor(count).to(total.device, torch.float64)])

    def finalize(self, sums: torch.Tensor) -> dict[str, float]:
        """Divide all-reduced sums by the all-reduced count: ``{metric: value}``."""
        return finalize_sums(self.metrics, sums)

    def higher_is_better(self, metric: str) -> bool:
        return HIGHER_IS_BETTER.get(metric, False)


class TaskObjective(Objective):
    """The built-in objective of ``task``: cross-entropy (classify, tag) or squared error (regress),
    with the task's metrics; the count is the global batch's (sequences, or real tokens for tag)."""

    def __init__(self, task: str) -> None:
        if task not in METRICS:
            raise ValueError(f"task should be one of {', '.join(METRICS)}, got {task!r}")
        self.name, self.task, self.metrics = task, task, METRICS[task]

    def loss(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        local = batch.mask.sum() if self.task == "tag" else torch.ones_like(batch.weights).sum()
        return loss_sum(self.task, outputs, batch), local * (batch.weights[0] > 0)

    def global_count(self, batch: Batch) -> float:
        return float(global_count(self.task, batch))

    def metric_sums(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return metric_sums(self.task, outputs, batch)


class LossFunction(Objective):
    """A user's ``loss_fn(outputs, batch) -> (loss_sum, count)``: a sum over this rank's samples (weigh
    each by ``batch.weights``: 0 for the filler sample a rank gets when a global batch has fewer
    sequences than ranks) and the count it is a sum over. Its metric is ``loss``."""

    def __init__(self, fn) -> None:
        self.fn, self.name = fn, getattr(fn, "__name__", "loss_fn")

    def loss(self, outputs: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, float | torch.Tensor]:
        result = self.fn(outputs, batch)
        if not (isinstance(result, tuple) and len(result) == 2):
            raise TypeError(f"{self.name} should return (loss_sum, count), got {type(result).__name__}")
        return result


def as_objective(spec) -> Objective:
    """An :class:`Objective` from a task name, an Objective, or a loss function (see :class:`LossFunction`)."""
    if isinstance(spec, Objective):
        return spec
    if isinstance(spec, str):
        return TaskObjective(spec)
    if callable(spec):
        return LossFunction(spec)
    raise TypeError(f"objective should be a task name, an Objective or a loss function, got {type(spec).__name__}")
