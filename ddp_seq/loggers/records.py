"""What a metrics record holds: the metric names, the per-class lists, the step-time phases, and
the scalars each tracker charts from a record.

``metrics.jsonl``, wandb and TensorBoard all name their values through :func:`record_scalars`, so
they agree. The names live here, below both the loggers and the training code that produces the
records, so neither has to import the other to know them.
"""

from __future__ import annotations

from typing import Any

#: Scalar metric names per task, in print order. ``loss`` is the training loss per sample (per
#: token for tag); ``f1_macro`` is derived from the confusion counts, the others are sums / count.
METRICS = {"classify": ("loss", "accuracy", "f1_macro"), "tag": ("loss", "accuracy", "f1_macro"),
           "regress": ("loss", "mse", "mae")}

#: Per-class results of classify and tag besides :data:`METRICS`: lists indexed by class id, and
#: ``confusion`` (rows = true class, columns = predicted class, as scikit-learn's ``confusion_matrix``).
PER_CLASS = ("precision", "recall", "f1", "support", "confusion")

#: The phases of a training step, in the order a step goes through them (see ``train.steptime``).
PHASES = ("data", "forward", "backward", "sync", "optimizer", "other")


def record_scalars(record: dict[str, Any]) -> dict[str, int | float]:
    """The numbers of one ``metrics.jsonl`` record, named as wandb and TensorBoard show them.

    ``<kind>/<key>`` for ``train`` and ``epoch`` records, ``<key>`` for the others (the summary).
    A per-class list (``val_precision``, ``val_recall``, ``val_f1``, ``val_support``) gives
    ``<name>/<class>`` for each class, named from ``val_classes`` when the record has it; any other
    list (one value per rank, e.g. ``padded_tokens_per_rank``) gives ``<name>/rank<i>`` for each
    element that is a number. Everything else -- ``kind`` and ``step`` themselves, None, strings,
    dicts, the lists inside a nested list (a confusion matrix) -- is left out: trackers chart scalars.
    """
    kind = record.get("kind")
    values: dict[str, int | float] = {}
    for key, value in record.items():
        # *_classes holds class names, which are integers when the labels were class indices: not metrics.
        if key in ("kind", "step") or value is None or key.endswith("_classes"):
            continue
        name = f"{kind}/{key}" if kind in ("train", "epoch") else key
        if isinstance(value, list):  # numbers only: not the confusion matrix (lists) nor class names
            prefix, _, metric = key.partition("_")
            if metric in PER_CLASS:
                classes = record.get(f"{prefix}_classes") or []
                labels = [str(classes[i]) if i < len(classes) else f"class{i}" for i in range(len(value))]
            else:
                labels = [f"rank{i}" for i in range(len(value))]
            values.update({f"{name}/{label}": v for label, v in zip(labels, value) if isinstance(v, (int, float))})
        elif isinstance(value, (int, float)):
            values[name] = value
    return values
