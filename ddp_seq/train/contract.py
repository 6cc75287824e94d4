"""What the Trainer expects of the parts it is handed, checked before the first step.

A user's ``Dataset`` and ``nn.Module`` meet ddp_seq here, and each way they can miss the contract
is one line naming what to change -- not a traceback deep in ``collate`` or ``cross_entropy``, and
not a failure after a whole epoch:

- every item is a ``(sequence, target)`` pair (a dict is not);
- a target is a number (a class id, a value) or a per-step array of them, never a string label;
- the model's ``forward(inputs, lengths)`` returns one tensor, which the objective can score;
- a classify or tag target is a class id the model's outputs can score (``0 <= target < C``),
  checked over every item of the training and validation data (one pass over the targets; a
  ``targets`` attribute, as the built-in readers have, spares it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ddp_seq.data.collate import IGNORE_INDEX, collate_for, fetch
from ddp_seq.data.sampler import Share, lengths_of
from ddp_seq.errors import UserError, first_line
from ddp_seq.train.objective import Objective, TaskObjective

#: What an item should be, said in every refusal of one.
ITEM_SHAPE = ("(sequence, target) pairs: a sequence [T, F] of floats or [T] of token ids, a target that is a "
              "class id, a value or a per-step [T] array")


def dataset_lengths(dataset, which: str) -> np.ndarray:
    """The sequence lengths ``[N]`` of a dataset (:func:`~ddp_seq.data.sampler.lengths_of`); a bad one
    is the user's error, named: ``"<which> data: ..."``."""
    try:
        return lengths_of(dataset)
    except (ValueError, TypeError) as e:
        raise UserError(f"{which} data: {e}") from None


def check_item(dataset, which: str) -> None:
    """Refuse a dataset whose first item is not a ``(sequence, target)`` pair of numbers.

    Raises:
        UserError: ``"<which> data: item 0 ..."``, one line saying what the item is and should be.
    """
    if len(dataset) == 0:
        raise UserError(f"{which} data: the dataset is empty (0 items); training and validation need at least "
                        "one item each")
    try:
        item = dataset[0]
    except Exception as e:  # noqa: BLE001 -- the user's __getitem__
        raise UserError(f"{which} data: reading item 0 failed ({type(e).__name__}: {first_line(e)})") from None
    if isinstance(item, Mapping):
        keys = ", ".join(repr(k) for k in list(item)[:4])
        raise UserError(f"{which} data: item 0 is a dict (keys {keys}); ddp_seq datasets return {ITEM_SHAPE} -- "
                        "return (sequence, target) from __getitem__")
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        what = f"a {len(item)}-tuple" if isinstance(item, (tuple, list)) else f"a {type(item).__name__}"
        raise UserError(f"{which} data: item 0 is {what}; ddp_seq datasets return {ITEM_SHAPE}")
    target = item[1]
    kind = _as_array(target).dtype.kind
    if kind in "USO":
        raise UserError(f"{which} data: item 0's target is {target!r}, not a number; targets are class ids 0..C-1 "
                        "(map each label to its index, e.g. {label: i for i, label in enumerate(sorted(labels))}) "
                        "or values")


def probe(model: nn.Module, dataset, objective: Objective, mode: str, device: torch.device,
          key: str = "model", data_key: str = "train data", every_parameter: bool = False) -> torch.Tensor:
    """The model's outputs on a batch of the first (up to 2) training items, scored by ``objective``,
    and the backward pass of that loss (the gradients are dropped again; the model's train/eval mode
    and the RNG states are restored, so the probe changes nothing training will do).

    ``every_parameter``: every trainable parameter must get a gradient -- DDP without
    ``find_unused_parameters`` waits for each one and fails at the first step otherwise
    ("Expected to have finished reduction in the prior iteration").

    Raises:
        UserError: the items do not collate (one line naming ``data_key``), ``forward`` fails or
            returns no single tensor, the objective cannot score what it returns, the backward pass
            fails, or (``every_parameter``) parameters get no gradient (naming ``key`` and them).
    """
    share = Share(range(min(2, len(dataset))))
    try:
        items = fetch(dataset, share)
        share.global_count = len(items)
        batch = collate_for(mode)(items).to(device)
    except Exception as e:  # noqa: BLE001 -- the user's items
        raise UserError(f"{data_key}: the first items do not make a batch ({type(e).__name__}: {first_line(e)}); "
                        f"items should be {ITEM_SHAPE}") from None
    was_training = model.training
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    grads = [p.grad for _, p in trainable]
    # train mode, as training runs it (cuDNN's RNN backward needs it); dropout's draws are undone
    model.train()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            outputs = model(batch.inputs, batch.model_lengths)
            if not isinstance(outputs, torch.Tensor):
                raise UserError(f"{key}: forward(inputs, lengths) returned a {type(outputs).__name__}, not a tensor; "
                                "return the outputs the objective scores (classify [B, C] logits, regress [B], "
                                "tag [B, T, C]) -- not a tuple such as (outputs, state)")
            for _, p in trainable:
                p.grad = None
            loss, _ = objective.loss(outputs, batch)
            if loss.requires_grad:
                loss.backward()
        unused = [name for name, p in trainable if p.grad is None]
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's forward or loss
        raise UserError(f"{key}: failed on a probe batch of {len(items)} training sequence(s) "
                        f"({type(e).__name__}: {first_line(e)})") from None
    finally:
        for (_, p), grad in zip(trainable, grads):
            p.grad = grad
        model.train(was_training)
    if every_parameter and unused:
        shown = ", ".join(unused[:4]) + (f" (and {len(unused) - 4} more)" if len(unused) > 4 else "")
        raise UserError(f"{key}: {len(unused)} of {len(trainable)} trainable parameters get no gradient from the "
                        f"loss ({shown}), and DDP fails at the first step waiting for them; use them in forward, "
                        "freeze them (requires_grad=False), or set distributed.find_unused_parameters=true")
    return outputs.detach()


def needs_every_gradient(mode: str, world_size: int, find_unused_parameters: bool) -> bool:
    """Whether DDP will wait for a gradient of every parameter: it wraps the model (``ddp`` on several
    ranks) without ``distributed.find_unused_parameters``."""
    return mode == "ddp" and world_size > 1 and not find_unused_parameters


def _as_array(value) -> np.ndarray:
    return np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)


def item_targets(dataset) -> tuple[np.ndarray, bool]:
    """Every target of ``dataset`` as one array, and whether it is one per item (else per step):
    its ``targets`` attribute (the built-in readers', a fold's), else one pass over the items."""
    saved = getattr(dataset, "targets", None)
    if saved is not None:
        array = np.asarray(saved)
        return array, array.ndim == 1 and len(array) == len(dataset) and not getattr(dataset, "per_step", False)
    targets = [_as_array(dataset[i][1]) for i in range(len(dataset))]
    if all(t.ndim == 0 for t in targets):
        return np.array([t.item() for t in targets]), True
    return np.concatenate([t.reshape(-1) for t in targets]), False


def check_classes(dataset, which: str, objective: Objective, outputs: torch.Tensor) -> None:
    """Refuse classify or tag targets the model cannot score: outside ``[0, C)``, ``C`` the last
    dimension of the probe's ``outputs`` (``IGNORE_INDEX`` allowed per step). Other objectives pass.

    Raises:
        UserError: naming the item (or, for per-step targets, the value) and the model's classes.
    """
    if not isinstance(objective, TaskObjective) or objective.task == "regress":
        return
    classes = int(outputs.shape[-1])
    targets, per_item = item_targets(dataset)
    if not np.issubdtype(targets.dtype, np.integer):
        if not (np.all(np.isfinite(targets)) and np.all(targets == np.round(targets))):
            raise UserError(f"{which} data: {objective.task} targets should be class ids (integers), got "
                            f"{targets.dtype} values such as {targets.reshape(-1)[0]!r}")
        targets = targets.astype(np.int64)
    bad = (targets < 0) | (targets >= classes)
    if not per_item:
        bad &= targets != IGNORE_INDEX
    if bad.any():
        first = int(np.argmax(bad))
        where = f"item {first} has target" if per_item else "a per-step target is"
        raise UserError(f"{which} data: {where} {int(targets[first])}, outside the model's {classes} outputs "
                        f"(class ids 0..{classes - 1}); give the model as many outputs as there are classes")


def data_widths(dataset, outputs: torch.Tensor, objective: Objective) -> dict[str, Any]:
    """What rebuilds a model for this data (``evaluate``/``predict`` on a library checkpoint): its
    ``num_inputs`` (features per step, 0 for token ids), ``vocab_size`` (0 for features; the data's
    ``vocab_size`` attribute, else the largest id + 1 over every item) and ``num_outputs``."""
    first = _as_array(dataset[0][0])
    tokens = first.ndim == 1 and np.issubdtype(first.dtype, np.integer)
    vocab = int(getattr(dataset, "vocab_size", 0) or 0)
    if tokens and not vocab:
        vocab = 1 + max(int(_as_array(dataset[i][0]).max()) for i in range(len(dataset)))
    regress = isinstance(objective, TaskObjective) and objective.task == "regress"
    return {"num_inputs": 0 if tokens else int(first.shape[-1]), "vocab_size": vocab if tokens else 0,
            "num_outputs": 1 if regress else int(outputs.shape[-1])}


def check_parts(module: nn.Module, train_data, val_data, objective: Objective, mode: str, device: torch.device,
                extra: dict[str, Any], every_parameter: bool = False) -> dict[str, Any]:
    """The Trainer's checks after :func:`check_item`: the probe batch and the targets of both
    datasets. Returns ``extra`` completed with what rebuilds the model for ``evaluate`` /
    ``predict`` where the caller did not give it: its widths (:func:`data_widths`), its objective
    (a task name; None for the user's own) and its class (``module:QualName``).

    Raises:
        UserError: see :func:`probe` and :func:`check_classes`.
    """
    outputs = probe(module, train_data, objective, mode, device, every_parameter=every_parameter)
    for data, which in ((train_data, "train"), (val_data, "val")):
        check_classes(data, which, objective, outputs)
    if any(key not in extra for key in ("num_inputs", "num_outputs", "vocab_size")):
        extra = {**data_widths(train_data, outputs, objective), **extra}
    builtin = isinstance(objective, TaskObjective)
    return {"objective": objective.name if builtin else None,
            "model_class": f"{type(module).__module__}:{type(module).__qualname__}", **extra}
