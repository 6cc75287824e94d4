"""Checkpoint files: written atomically, read back with ``torch.load(..., weights_only=True)``, one
entry per part.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts -- nothing that needs
unpickling arbitrary classes -- so loading it can never execute code from the file. Each part
sits under a fixed key (:data:`PARTS`, as torchtitan's checkpointer and Lightning's
``dump_checkpoint`` keep theirs apart) and is what that part's own ``state_dict()`` returned, so
each is loaded back by its own ``load_state_dict()``:

======================  =====================================================================
``model``               the unwrapped module's ``state_dict()``
``optimizer``           ``torch.optim.Optimizer.state_dict()``
``scheduler``           the LR scheduler's ``state_dict()``
``scaler``              ``torch.amp.GradScaler.state_dict()`` (fp16)
``sampler``             the data position: ``BucketBatchSampler.state_dict()`` -- ``{"version",
                        "epoch", "position", "plan"}``, the next global batch and what the
                        epoch's batches depend on
``train_state``         :meth:`ddp_seq.train.state.TrainState.state_dict` (step, history, best, ...)
``rng``                 every rank's RNG states (:func:`ddp_seq.train.resume.capture_rng`)
``config``              the job's config as a plain dict
``extra``               ``Trainer(checkpoint_extra=...)``: the builders store the data's encoding
                        and the model's inputs and outputs here, to rebuild it for ``predict``
======================  =====================================================================

``format_version`` says how the parts are laid out; :func:`load_checkpoint` migrates every older
format it knows into the current one, so the rest of ddp_seq reads one layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ddp_seq.errors import UserError, first_line
from ddp_seq.fileio import atomic_write, fsync_dir

# 2: resumable mid-epoch (position, RNG states, history, num_outputs), one flat dict.
# 3: one entry per part under fixed keys (PARTS); format 2 is migrated when loaded.
FORMAT_VERSION = 3

#: The parts of a checkpoint, each under its own key (see the module doc).
PARTS = ("model", "optimizer", "scheduler", "scaler", "sampler", "train_state", "rng", "config", "extra")
#: The parts a checkpoint needs to resume training (``best.pt`` and step checkpoints have them all).
RESUMABLE = ("model", "optimizer", "scheduler", "scaler", "sampler", "train_state", "rng")


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that readers see the old file or the new one, never a part
    (:func:`~ddp_seq.fileio.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda f: torch.save({"format_version": FORMAT_VERSION, **state}, f))


def _why_unloadable(error: Exception) -> str:
    """One plain line for a failed ``torch.load`` (torch's own text spans lines, carries terminal
    escapes, and for a refused pickle explains how to load the file anyway -- not our advice)."""
    text = str(error)
    if "Weights only load failed" in text:
        return ("holds pickled Python objects beyond tensors and plain containers; ddp_seq loads checkpoints "
                "with weights_only=True and never unpickles code, so it refuses this file")
    return f"not a loadable ddp_seq checkpoint: truncated or corrupt ({first_line(error)})"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``; a bad file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    # torch.save writes a zip archive (a pickle before torch 1.6); anything else (a log, a YAML file)
    # would be reported by torch.load as a refused pickle, which is not what is wrong.
    if not magic.startswith((b"PK\x03\x04", b"\x80")):
        raise UserError(f"{path}: not a checkpoint (torch.save writes a zip archive; this file is not one)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets a one-line answer
        raise UserError(f"{path}: {_why_unloadable(e)}") from None
    found = state.get("format_version") if isinstance(state, dict) else None
    if found == 2:
        return migrate_v2(state)
    if found != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format version {found!r}, this ddp_seq reads 2 and {FORMAT_VERSION}")
    return state


#: Format 2's entries of the loop's state (the rest of its flat dict is parts or ``extra``).
_V2_TRAIN_STATE = ("step", "progress", "history", "best", "stale", "finished")
_V2_LOOP = (*_V2_TRAIN_STATE, "epoch", "position", "plan", "train_state_version", "metrics", "format_version")


def migrate_v2(flat: dict[str, Any]) -> dict[str, Any]:
    """A format-2 checkpoint (one flat dict: ddp_seq up to commit e8c7b2d) laid out in parts.

    Weights, optimizer, scheduler, scaler, RNG states and config move as they are; the loop's
    ``(epoch, position, plan)`` becomes the ``sampler`` part, its step, history, best, stale and
    finished the ``train_state`` part, and every other entry (``num_inputs``, ``num_outputs``,
    ``vocab_size``, ``fold``, ``encoding``, a user's ``checkpoint_extra``) the ``extra`` part. A
    migrated checkpoint predicts and resumes exactly as the file did (tested on files of that code).
    """
    state: dict[str, Any] = {"format_version": FORMAT_VERSION}
    for key in ("model", "optimizer", "scheduler", "scaler", "rng", "config"):
        if key in flat:
            state[key] = flat[key]
    if "epoch" in flat:
        state["sampler"] = {"version": 1, "epoch": flat["epoch"], "position": flat.get("position", 0)}
        if flat.get("plan") is not None:
            state["sampler"]["plan"] = flat["plan"]
    if any(key in flat for key in _V2_TRAIN_STATE):
        state["train_state"] = {"version": 2, **{key: flat[key] for key in _V2_TRAIN_STATE if key in flat}}
    state["extra"] = {key: value for key, value in flat.items() if key not in _V2_LOOP and key not in state}
    return state


def trained_at(state: dict[str, Any]) -> dict[str, Any]:
    """Where the run stood when ``state`` was written: ``{"epoch", "step", "metrics"}`` (epochs
    finished, optimizer steps, the last finished epoch's record; None / ``{}`` where unknown)."""
    train, data = state.get("train_state") or {}, state.get("sampler") or {}
    history = train.get("history") or []
    return {"epoch": data.get("epoch"), "step": train.get("step"), "metrics": history[-1] if history else {}}


def is_resumable(state: dict[str, Any]) -> bool:
    """Whether ``state`` holds every part training resumes from (:data:`RESUMABLE`)."""
    return all(key in state for key in RESUMABLE)


def check_shapes(saved: dict[str, torch.Tensor], module: torch.nn.Module, source: str,
                 changed: list[str] | tuple[str, ...] = (), fresh: str = "logging.name") -> None:
    """Refuse weights that do not fit ``module``, naming the config keys that changed since the
    checkpoint and shape the model (``changed``, e.g. ``["model.hidden 128 -> 64"]``) when there are
    any, else the first mismatching parameter."""
    expected = module.state_dict()
    why = (f"the model's shape changed since the checkpoint ({', '.join(changed)}); resume with the saved "
           f"values, or start a new run (another {fresh})") if changed else ""
    for name, tensor in expected.items():
        if name not in saved:
            raise UserError(f"{source}: " + (why or f"checkpoint has no parameter {name!r}: it was saved from a "
                                             "different model (compare the model.* keys)"))
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise UserError(f"{source}: " + (why or f"parameter {name!r} has shape {list(saved[name].shape)} in "
                            f"the checkpoint but {list(tensor.shape)} for this config (compare the model.* and "
                            "data.* keys)"))
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise UserError(f"{source}: " + (why or f"checkpoint has parameter {extra[0]!r} that this config's model "
                                         "lacks (compare the model.* keys)"))


def check_encoding(state: dict[str, Any], encoding: dict[str, Any], source: str) -> None:
    """Refuse to resume when the data now encodes differently from the checkpoint's (the training file,
    ``data.tokenizer`` or ``data.min_freq`` changed): the same ids would mean other tokens or classes.
    ``encoding`` is the current ``Encoding.state_dict()``; ``state`` a loaded checkpoint."""
    saved = (state.get("extra") or {}).get("encoding")
    if saved is None:  # written before encodings were stored (synthetic and npz data): check_shapes suffices
        return
    if saved.get("tokenizer") != encoding.get("tokenizer"):  # a subword tokenizer's content, not its path
        raise UserError(f"{source}: data.tokenizer differs from the tokenizer stored in the checkpoint (the file "
                        "changed, or another tokenizer is named); resume with the tokenizer it was trained with")
    for name, what in (("vocab", "vocabulary"), ("classes", "set of classes")):
        old, new = saved.get(name), encoding.get(name)
        if old != new:
            sizes = f"{len(old) if old is not None else 'none'} entries in the checkpoint, " \
                    f"{len(new) if new is not None else 'none'} now"
            raise UserError(f"{source}: the {what} built from the data differs from the checkpoint's ({sizes}); "
                            "the training file, data.tokenizer or data.min_freq changed since it was saved")


def link_latest(target: Path, link: Path) -> None:
    """Point ``link`` (e.g. ``last.pt``) at ``target`` without writing the bytes again.

    A hard link made under a temporary name and renamed over ``link``, so readers see the old file
    or the new one; falls back to a copy where hard links are not supported.
    """
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)
    fsync_dir(link.parent)


def nonfinite_parameter(weights: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of ``weights`` (a ``state_dict``) that holds a NaN
    or an infinity, or None when every one is finite."""
    for name, tensor in weights.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite(state: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint whose weights hold NaN or infinity (a run that diverged, written by a
    ddp_seq before the divergence stop): its predictions would be NaN and a resume would train on
    from garbage."""
    name = nonfinite_parameter(state["model"])
    if name is not None:
        raise UserError(f"{source}: parameter {name!r} holds NaN or infinity: the run had diverged when this "
                        "checkpoint was written; use an earlier checkpoint of it")
