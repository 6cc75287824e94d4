"""The config turned into the Trainer's parts: data, model, objective (layer 2 of three).

``model.target`` / ``data.target`` name the user's own classes and functions
(``package.module:Name`` or ``path/to/file.py:Name``); empty means the built-in ``SeqModel`` and
the built-in readers. Code is imported only from a target the user gave in their own config or
command line -- never because a checkpoint names one (see :func:`ddp_seq.train.checkpoint.trusted_config`).
Whatever a target gets wrong stops the job before training with one line naming the key.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddp_seq.config import Config
from ddp_seq.errors import UserError, first_line

#: What a model target may be called with (each passed only if its signature accepts it).
MODEL_ARGS = ("task", "num_inputs", "num_outputs", "vocab_size")


def import_target(spec: str, key: str) -> Any:
    """The object ``spec`` names: ``package.module:Name`` (imported from ``sys.path``) or
    ``path/to/file.py:Name`` (loaded from that file; relative paths from the working directory).
    ``Name`` may be dotted (``Outer.Inner``). Any failure is a :class:`UserError` naming ``key``."""
    module_part, _, name = spec.rpartition(":")
    if not module_part or not name:
        raise UserError(f"{key}: {spec!r} should be package.module:Name or path/to/file.py:Name")
    try:
        if module_part.endswith(".py"):
            path = Path(module_part).resolve()
            if not path.is_file():
                raise UserError(f"{key}: {spec!r}: file {module_part} not found")
            module_name = f"ddp_seq_target_{path.stem}_{abs(hash(str(path)))}"
            module = sys.modules.get(module_name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
        target: Any = module
        for part in name.split("."):
            target = getattr(target, part)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 -- an import can raise anything; the user gets one line
        raise UserError(f"{key}: cannot import {spec!r} ({type(e).__name__}: {first_line(e)})") from None
    if not callable(target):
        raise UserError(f"{key}: {spec!r} is a {type(target).__name__}, not a class or function")
    return target


def call_with_accepted(target: Any, available: dict[str, Any], args: dict[str, Any], key: str) -> Any:
    """``target(**accepted, **args)``: ``accepted`` are the entries of ``available`` its signature
    takes (all of them with ``**kwargs``); ``args`` (``model.args``) are passed as they are."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        params = {}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = {k: v for k, v in available.items() if (takes_all or k in params) and k not in args}
    try:
        return target(**accepted, **args)
    except Exception as e:  # noqa: BLE001 -- the user's constructor; one line naming the key
        raise UserError(f"{key}: calling {getattr(target, '__name__', target)}(...) failed "
                        f"({type(e).__name__}: {first_line(e)})") from None


@dataclass
class DataParts:
    """The datasets of a job and what the model needs to know about them."""

    train: Any
    val: Any
    num_inputs: int  # feature channels per step (0 for token ids)
    num_outputs: int  # classes, or 1 for regress
    vocab_size: int = 0  # > 0 when sequences are token ids
    encoding: dict[str, Any] | None = None  # the built-in readers' Encoding.state_dict()
    notes: list[str] = field(default_factory=list)


def build_data(cfg: Config, splits=None) -> DataParts:
    """The train and val data of ``cfg``: ``data.target``'s datasets, or ``splits`` (or the built-in
    readers' :func:`~ddp_seq.data.readers.sources.load_splits`)."""
    if cfg.data.target:
        return _target_data(cfg)
    from ddp_seq.data.readers.sources import describe, load_splits

    splits = splits or load_splits(cfg.data)
    enc, task = splits.encoding, cfg.data.task
    return DataParts(splits.train, splits.val, enc.num_features, enc.num_outputs(task), enc.vocab_size,
                     enc.state_dict(), describe(splits, task))


def _target_data(cfg: Config) -> DataParts:
    key, task = "data.target", cfg.data.task
    fn = import_target(cfg.data.target, key)
    result = call_with_accepted(fn, {"task": task, "seed": cfg.data.seed}, dict(cfg.data.args), key)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise UserError(f"{key}: {cfg.data.target} should return (train_dataset, val_dataset); got "
                        f"{type(result).__name__}")
    train, val = result
    for name, ds in (("train", train), ("val", val)):
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__") or len(ds) == 0:
            raise UserError(f"{key}: the {name} dataset should be a non-empty map-style Dataset "
                            "(__len__ and __getitem__ returning (sequence, target))")
    try:
        sequence, _ = train[0]
        sequence = np.asarray(sequence)
        token_ids = sequence.ndim == 1
        vocab_size = int(getattr(train, "vocab_size", 0)) or (_max_over(train, lambda s: s.max()) + 1
                                                              if token_ids else 0)
        num_outputs = int(getattr(train, "num_outputs", 0)) or (
            1 if task == "regress" else _max_over(train, lambda s: s.max(), item=1) + 1)
    except Exception as e:  # noqa: BLE001 -- the user's dataset
        raise UserError(f"{key}: reading the first training items failed ({type(e).__name__}: {first_line(e)})") \
            from None
    notes = [f"data: {len(train)} training and {len(val)} validation samples from {cfg.data.target}"]
    return DataParts(train, val, 0 if token_ids else int(sequence.shape[-1]), num_outputs, vocab_size, None, notes)


def _max_over(dataset, reduce, item: int = 0) -> int:
    """The largest value over every item's field ``item`` (a pass over the data, when it has no attribute)."""
    return int(max(reduce(np.asarray(dataset[i][item])) for i in range(len(dataset))))


def build_model(cfg: Config, data: DataParts, device: torch.device | None = None) -> nn.Module:
    """``model.target`` called with what it accepts among task, num_inputs, num_outputs, vocab_size and
    ``model.args``; or the built-in ``SeqModel``. The initial weights follow torch's global seed."""
    if not cfg.model.target:
        from ddp_seq.nn.seq_model import build_model as build_seq_model

        return build_seq_model(cfg.data.task, data.num_inputs, data.num_outputs, cfg.model,
                               vocab_size=data.vocab_size, device=device)
    key = "model.target"
    cls = import_target(cfg.model.target, key)
    available = {"task": cfg.data.task, "num_inputs": data.num_inputs, "num_outputs": data.num_outputs,
                 "vocab_size": data.vocab_size}
    model = call_with_accepted(cls, available, dict(cfg.model.args), key)
    if not isinstance(model, nn.Module):
        raise UserError(f"{key}: {cfg.model.target} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.to(device or torch.device("cpu"))


def probe(model: nn.Module, data: DataParts, cfg: Config, device: torch.device, objective=None) -> None:
    """Run ``model`` forward and the loss on a tiny batch of the first training items (no gradient
    kept), so a model that does not fit the data stops here with one line, not in the middle of training."""
    from ddp_seq.data.collate import collate_for
    from ddp_seq.train.objective import as_objective

    key = "model.target" if cfg.model.target else "data.target" if cfg.data.target else "model"
    items = [data.train[i] for i in range(min(2, len(data.train)))]
    try:
        batch = collate_for(cfg.training.mode)(items).to(device)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"data.target: the first training items do not collate ({type(e).__name__}: "
                        f"{first_line(e)}); items should be (sequence [T, F] or [T], target)") from None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(batch.inputs, batch.model_lengths)
            as_objective(objective or cfg.data.task).loss(outputs, batch)
    except Exception as e:  # noqa: BLE001 -- the user's forward
        raise UserError(f"{key}: {cfg.model.target or 'the model'} failed on a probe batch of {len(items)} "
                        f"training sequence(s) ({type(e).__name__}: {first_line(e)})") from None
    finally:
        model.train(was_training)


def checkpoint_extra(data: DataParts, fold: int | None = None) -> dict[str, Any]:
    """What checkpoints store beside the weights to rebuild the model for evaluate and predict."""
    extra = {"num_inputs": data.num_inputs, "num_outputs": data.num_outputs, "vocab_size": data.vocab_size,
             "fold": fold}
    if data.encoding is not None:
        extra["encoding"] = data.encoding
    return extra


@dataclass
class Parts:
    """What the Trainer is handed, built from the config."""

    data: DataParts
    model: nn.Module


def build_parts(cfg: Config, info, splits=None) -> Parts:
    """Data and model (the same seed on every rank), probed when they are the user's: everything that
    can fail on the user's input fails here, before a run directory is created for it."""
    data = build_data(cfg, splits)
    # The same seed on every rank gives identical initial weights; DDP also broadcasts rank 0's
    # parameters when it wraps the module.
    torch.manual_seed(cfg.training.seed)
    model = build_model(cfg, data, info.device)
    if cfg.model.target or cfg.data.target:
        probe(model, data, cfg, info.device)
    return Parts(data, model)


def build_trainer(cfg: Config, info, logger, run_dir: Path | None, resume_from: Path | None = None,
                  splits=None, fold: int | None = None, parts: Parts | None = None):
    """The :class:`~ddp_seq.train.trainer.Trainer` of ``cfg`` over ``parts`` (built here when not given)."""
    from ddp_seq.train.trainer import Trainer

    parts = parts or build_parts(cfg, info, splits)
    data = parts.data
    return Trainer(parts.model, data.train, data.val, cfg, info=info, logger=logger, run_dir=run_dir,
                   resume_from=resume_from, checkpoint_extra=checkpoint_extra(data, fold), notes=data.notes)
