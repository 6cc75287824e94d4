"""Atomic checkpoint files, read back with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts -- nothing that needs
unpickling arbitrary classes -- so loading it can never execute code from the file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ddp_seq.errors import UserError, first_line
from ddp_seq.fileio import atomic_write, fsync_dir

# 2: resumable mid-epoch (position, RNG states, history, num_outputs).
FORMAT_VERSION = 2


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
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else None
        raise UserError(f"{path}: checkpoint format version {found!r}, this ddp_seq reads {FORMAT_VERSION}")
    return state


def check_shapes(saved: dict[str, torch.Tensor], module: torch.nn.Module, source: str) -> None:
    """Refuse weights that do not fit ``module``, naming the first mismatching parameter."""
    expected = module.state_dict()
    for name, tensor in expected.items():
        if name not in saved:
            raise UserError(f"{source}: checkpoint has no parameter {name!r}: it was saved from a different model "
                            "(compare the model.* keys)")
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise UserError(f"{source}: parameter {name!r} has shape {list(saved[name].shape)} in the checkpoint "
                            f"but {list(tensor.shape)} for this config (compare the model.* and data.* keys)")
    extra = sorted(set(saved) - set(expected))
    if extra:
        raise UserError(f"{source}: checkpoint has parameter {extra[0]!r} that this config's model lacks "
                        "(compare the model.* keys)")


def check_encoding(state: dict[str, Any], encoding: dict[str, Any], source: str) -> None:
    """Refuse to resume when the data now encodes differently from the checkpoint's (the training file,
    ``data.tokenizer`` or ``data.min_freq`` changed): the same ids would mean other tokens or classes.
    ``encoding`` is the current ``Encoding.state_dict()``."""
    saved = state.get("encoding")
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
