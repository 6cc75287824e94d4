"""The config turned into the Trainer's parts: data, model, objective (layer 2 of three).

``model.target`` / ``data.target`` name the user's own classes and functions
(``package.module:Name`` or ``path/to/file.py:Name``); empty means the built-in ``SeqModel`` and
the built-in readers. Code is imported only from a target the user gave in their own config or
command line -- never because a checkpoint names one (see :func:`trusted_config`).
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

from ddp_seq.config import Config, ModelConfig, from_dict
from ddp_seq.errors import UserError, first_line
from ddp_seq.nn.seq_model import SeqModel, resolve_execution
from ddp_seq.train.checkpoint import check_finite, check_shapes, load_checkpoint
from ddp_seq.train.contract import check_item

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
            # The file's folder is importable, as it is for `python file.py` (its sibling modules).
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
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
    for name, ds in (("train", train), ("val", val)):
        check_item(ds, f"{key}: {name}")  # (sequence, target) pairs of numbers, before reading their fields
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


def seq_model_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The :class:`~ddp_seq.nn.seq_model.SeqModel` keyword arguments the ``model`` section sets
    (``execution`` apart: it is resolved for a device)."""
    return {"embedding_dim": cfg.embedding_dim, "hidden": cfg.hidden, "layers": cfg.layers, "cell": cfg.cell,
            "bidirectional": cfg.bidirectional, "dropout": cfg.dropout, "pooling": cfg.pooling}


def build_seq_model(task: str, num_inputs: int, num_outputs: int, cfg: ModelConfig, vocab_size: int = 0,
                    device: torch.device | None = None) -> SeqModel:
    """The built-in :class:`~ddp_seq.nn.seq_model.SeqModel` of the ``model`` section ``cfg`` on
    ``device`` (``model.execution=auto`` resolved for it); the initial weights follow torch's global seed."""
    device = device or torch.device("cpu")
    return SeqModel(task, num_inputs, num_outputs, vocab_size=vocab_size, **seq_model_kwargs(cfg),
                    execution=resolve_execution(cfg.execution, device)).to(device)


def build_model(cfg: Config, data: DataParts, device: torch.device | None = None) -> nn.Module:
    """``model.target`` called with what it accepts among task, num_inputs, num_outputs, vocab_size and
    ``model.args``; or the built-in ``SeqModel``. The initial weights follow torch's global seed."""
    if not cfg.model.target:
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


def probe(model: nn.Module, data: DataParts, cfg: Config, device: torch.device, objective=None,
          world_size: int = 1) -> None:
    """Run ``model`` forward and the loss on a tiny batch of the first training items (no gradient
    kept), so a model that does not fit the data stops here with one line naming the key, not in the
    middle of training -- the Trainer's own probe (:func:`ddp_seq.train.contract.probe`), run before
    the command line makes a run directory."""
    from ddp_seq.train.contract import needs_every_gradient
    from ddp_seq.train.contract import probe as probe_parts
    from ddp_seq.train.objective import as_objective

    key = "model.target" if cfg.model.target else "data.target" if cfg.data.target else "model"
    probe_parts(model, data.train, as_objective(objective or cfg.data.task), cfg.training.mode, device, key,
                data_key="data.target" if cfg.data.target else "train data",
                every_parameter=needs_every_gradient(cfg.training.mode, world_size,
                                                     cfg.distributed.find_unused_parameters))


def checkpoint_extra(data: DataParts, fold: int | None = None) -> dict[str, Any]:
    """What checkpoints store beside the weights to rebuild the model for evaluate and predict.
    ``data_from_config``: the data is what the checkpoint's config says (a library Trainer's
    checkpoint has no such promise: ``evaluate`` then asks for the data)."""
    extra = {"num_inputs": data.num_inputs, "num_outputs": data.num_outputs, "vocab_size": data.vocab_size,
             "fold": fold, "data_from_config": True}
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
        probe(model, data, cfg, info.device, world_size=info.world_size)
    return Parts(data, model)


def build_trainer(cfg: Config, info, logger, run_dir: Path | None, resume_from: Path | None = None,
                  splits=None, fold: int | None = None, parts: Parts | None = None):
    """The :class:`~ddp_seq.train.trainer.Trainer` of ``cfg`` over ``parts`` (built here when not given)."""
    from ddp_seq.train.trainer import Trainer

    parts = parts or build_parts(cfg, info, splits)
    data = parts.data
    # claimed: the command line decided the run directory and what to resume (ddp_seq.cli.rundir).
    return Trainer(parts.model, data.train, data.val, cfg, info=info, logger=logger, run_dir=run_dir,
                   resume_from=resume_from, claimed=True, checkpoint_extra=checkpoint_extra(data, fold),
                   notes=data.notes)


# -- rebuilding a model from a checkpoint (evaluate, predict, export) ----------------------------

def encoding_of(state: dict[str, Any], cfg):
    """The checkpoint's :class:`~ddp_seq.data.readers.encoding.Encoding`; checkpoints without one
    (synthetic and npz data before encodings were stored, a library Trainer's) get the one their
    shapes imply: class ids as classes, token ids as tokens."""
    from ddp_seq.data.readers.encoding import Encoding

    extra = state.get("extra") or {}
    if extra.get("encoding"):
        return Encoding.from_state_dict(extra["encoding"])
    classes = None if cfg.data.task == "regress" else list(range(extra["num_outputs"]))
    # A library Trainer's model of token ids has no vocabulary: ids are read as they are (an id at or
    # past vocab_size, or 0, becomes <unk>).
    vocab_size = int(extra.get("vocab_size") or 0)
    return Encoding(list(range(vocab_size)) if vocab_size else None, classes, extra["num_inputs"])


#: Config keys that make ddp_seq import code; a checkpoint naming one is not enough to do so.
TARGET_KEYS = ("model.target", "data.target")


def trusted_config(state: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), source: str = "checkpoint",
                   trust_target: bool = False):
    """The checkpoint's config with ``overrides``, refusing one that names a ``model.target`` or
    ``data.target`` the user did not allow: a checkpoint is data, and loading it must never make
    ddp_seq import code by itself (as ``weights_only=True`` never unpickles any). The user allows a
    target by giving the key in ``overrides`` (their command line) or with ``trust_target``
    (``--trust-target``, like Hugging Face's ``trust_remote_code``)."""
    given = {item.partition("=")[0].strip() for item in overrides}
    saved = state.get("config", {})
    for key in TARGET_KEYS:
        section, _, name = key.partition(".")
        value = saved.get(section, {}).get(name, "") if isinstance(saved.get(section), dict) else ""
        if value and not trust_target and key not in given:
            raise UserError(f"{source}: its config names {key}={value}, code that ddp_seq imports only on your say-so; "
                            f"pass {key}={value} on the command line if you trust it (or --trust-target)")
    cfg = from_dict(saved, overrides)
    return _library_checkpoint(state, cfg, given, source) if is_library_checkpoint(state) else cfg


#: ``extra["model_class"]`` of the built-in model.
SEQ_MODEL_CLASS = f"{SeqModel.__module__}:{SeqModel.__qualname__}"


def is_library_checkpoint(state: dict[str, Any]) -> bool:
    """Whether ``state`` was written by a Trainer a user built in their own code (not the config path)."""
    extra = state.get("extra") or {}
    return "model_class" in extra and not extra.get("data_from_config")


def _library_checkpoint(state: dict[str, Any], cfg: Config, given: set[str], source: str) -> Config:
    """A library Trainer's checkpoint names neither its model class nor its data in its config:
    the user names them (``model.target``, ``model.args``; ``data.target`` or a data file), else one
    line says which key to give. The objective it trained with becomes ``data.task``."""
    extra = state["extra"]
    model_class = extra["model_class"]
    if model_class != SEQ_MODEL_CLASS and not cfg.model.target:
        module, _, name = model_class.partition(":")
        where = "a script" if module == "__main__" else f"module {module}"
        raise UserError(f"{source}: written by the library Trainer from a {name} defined in {where}; name the class "
                        f"to rebuild it: model.target=path/to/file.py:{name} (or package.module:{name}), plus "
                        "model.args.NAME=value for constructor arguments other than num_inputs, num_outputs, "
                        "vocab_size and task")
    objective = extra.get("objective")
    if "data.task" not in given:
        if objective is None:
            raise UserError(f"{source}: trained with a loss function of its own, which ddp-seq cannot score; pass "
                            "data.task=classify, regress or tag to score its outputs as that task")
        cfg.data.task = objective
    return cfg


def require_named_data(state: dict[str, Any], overrides: list[str] | tuple[str, ...], source: str) -> None:
    """``evaluate`` of a library Trainer's checkpoint: its config's data section is whatever config
    the Trainer was given, so the data must be named on the command line.

    Raises:
        UserError: naming ``data.target`` and ``data.val_path``.
    """
    given = {item.partition("=")[0].strip() for item in overrides}
    if is_library_checkpoint(state) and not given & {"data.target", "data.val_path", "data.train_path"}:
        raise UserError(f"{source}: written by the library Trainer, so its config does not say which data it "
                        "trained on; name the validation data: data.target=path/to/file.py:function (returning "
                        "(train, val)), or data.format=jsonl (or npz, ...) data.val_path=FILE")


def restore_model(state: dict[str, Any], cfg, source: str, device: torch.device | None = None) -> torch.nn.Module:
    """The model a checkpoint's ``state`` holds, built for ``cfg`` (see :func:`trusted_config`) on
    ``device`` with its weights loaded."""
    encoding, task, extra = encoding_of(state, cfg), cfg.data.task, state.get("extra") or {}
    vocab_size = extra.get("vocab_size", encoding.vocab_size)
    parts = DataParts(None, None, extra.get("num_inputs", encoding.num_features),
                      extra.get("num_outputs", encoding.num_outputs(task)), vocab_size)
    check_finite(state, source)  # a diverged run's weights would predict NaN
    model = build_model(cfg, parts, device)
    check_shapes(state["model"], model, source)
    model.load_state_dict(state["model"])
    return model


def model_from_checkpoint(path: str | Path, trust_target: bool = False):
    """Rebuild the model saved in a checkpoint: returns ``(model, config, checkpoint dict)`` on the CPU.
    A checkpoint of a user's ``model.target`` needs ``trust_target=True`` (see :func:`trusted_config`)."""
    state = load_checkpoint(path)
    cfg = trusted_config(state, (), str(path), trust_target)
    return restore_model(state, cfg, str(path)), cfg, state
