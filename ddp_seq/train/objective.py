"""Per-task losses and metrics as *sums* over this rank's samples, never as local means.

The global normalisation lives in the trainer: every rank knows the size of the whole global
batch (see ``data.batching``), so sums can be divided by the global count without asking.

For classify and tag the built-in objective also counts the confusion matrix (true class x
predicted class, float64: exact below 2**53) in the same vector as the other sums, so one
all-reduce per evaluation gives exact macro-F1 and per-class precision / recall / F1 whatever
the world size (see :func:`class_metrics` for the definitions).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ddp_seq.data.collate import IGNORE_INDEX, Batch
from ddp_seq.loggers.records import METRICS, PER_CLASS  # noqa: F401 -- PER_CLASS: part of this module's API

#: The metrics :func:`metric_sums` sums (each divided by the count in :func:`finalize`).
SUMMED = {"classify": ("loss", "accuracy"), "tag": ("loss", "accuracy"), "regress": ("loss", "mse", "mae")}

#: Whether a larger value of the metric is better.
HIGHER_IS_BETTER = {"loss": False, "accuracy": True, "f1_macro": True, "mse": False, "mae": False}


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


@torch.no_grad()
def confusion_counts(task: str, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The confusion matrix of this rank's real samples (real tokens for tag), flattened row-major:
    ``[C * C]`` float64 on the outputs' device, entry ``C * true + predicted``; C = ``outputs.shape[-1]``.

    Filler samples (``batch.weights == 0``) and padded steps (tag) count 0. No host sync: the
    counts stay on the device until the evaluation's single all-reduce.
    """
    num_classes = outputs.shape[-1]
    predicted = outputs.argmax(-1)
    if task == "classify":
        valid = batch.weights > 0
    elif task == "tag":
        valid = batch.mask & (batch.weights[:, None] > 0)
    else:
        raise ValueError(f"confusion counts are for classify and tag, not {task!r}")
    # padded tag steps hold IGNORE_INDEX: point them at cell 0 with weight 0
    cells = torch.where(valid, batch.targets * num_classes + predicted, 0).reshape(-1)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.float64, device=outputs.device)
    # index_put_ with accumulate, not bincount: bincount with weights has no deterministic CUDA
    # kernel (it raises under torch.use_deterministic_algorithms); sums of integers are exact anyway.
    return counts.index_put_((cells,), valid.reshape(-1).double(), accumulate=True)


def class_metrics(confusion) -> dict[str, float | list]:
    """Macro-F1 and per-class figures from a ``[C, C]`` confusion matrix of counts (rows = true class).

    Returns ``f1_macro`` (float) and ``precision``, ``recall``, ``f1`` (lists of C floats),
    ``support`` (C ints: true samples, or tokens for tag, per class) and ``confusion`` (C lists of C
    ints). As scikit-learn's ``precision_recall_fscore_support`` with ``labels=range(C)`` and the
    default ``zero_division``: a class never predicted has precision 0.0, a class absent from the
    truth recall 0.0, and F1 = 2 tp / (2 tp + fp + fn) is 0.0 when that is 0 / 0. Macro-F1 is the
    unweighted mean over *all* C classes of the encoding, including classes absent from both the
    truth and the predictions (they count as 0.0), as ``f1_score(average="macro", labels=range(C))``.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    tp, predicted, true = np.diag(conf), conf.sum(0), conf.sum(1)

    def divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    f1 = divide(2 * tp, true + predicted)  # the same operations as scikit-learn: bit-identical results
    return {"f1_macro": float(np.mean(f1)) if len(f1) else 0.0, "precision": divide(tp, predicted).tolist(),
            "recall": divide(tp, true).tolist(), "f1": f1.tolist(), "support": [int(n) for n in true],
            "confusion": [[int(n) for n in row] for row in conf]}


def finalize(task: str, sums: torch.Tensor) -> dict[str, float | list]:
    """Divide all-reduced sums by the all-reduced count: ``{metric: value}``.

    ``sums``: :func:`metric_sums` (``[sum_1..sum_k, count]``), for classify and tag optionally
    followed by :func:`confusion_counts` (then f1_macro and the :data:`PER_CLASS` entries are added).
    """
    summed = len(SUMMED[task]) + 1
    result: dict[str, float | list] = finalize_sums(SUMMED[task], sums[:summed])
    if task != "regress" and len(sums) > summed:
        counts = sums[summed:].double().cpu().numpy()
        num_classes = math.isqrt(len(counts))
        if num_classes * num_classes != len(counts):
            raise ValueError(f"{len(counts)} confusion counts do not make a square matrix")
        result.update(class_metrics(counts.reshape(num_classes, num_classes)))
    return result


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
        """:func:`metric_sums`, then (classify, tag) the ``C * C`` :func:`confusion_counts`."""
        sums = metric_sums(self.task, outputs, batch)
        if self.task == "regress":
            return sums
        return torch.cat([sums, confusion_counts(self.task, outputs, batch)])

    def finalize(self, sums: torch.Tensor) -> dict[str, float | list]:
        """:data:`METRICS` of the task (floats) and, for classify and tag, the :data:`PER_CLASS` lists."""
        return finalize(self.task, sums)


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
