"""Atomic checkpoint files, read back with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts -- nothing that needs
unpickling arbitrary classes -- so loading it can never execute code from the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .config import UserError

FORMAT_VERSION = 1


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the file
    is renamed over ``path`` (atomic on POSIX); the directory is fsynced so the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint onto the CPU with ``weights_only=True``; a bad file is a :class:`UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file gets the same one-line answer
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a loadable ddp_seq checkpoint ({reason[:200]})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else None
        raise UserError(f"{path}: checkpoint format version {found!r}, this ddp_seq reads {FORMAT_VERSION}")
    return state


def model_from_checkpoint(path: str | Path):
    """Rebuild the model saved in a checkpoint: returns ``(model, config, checkpoint dict)`` on the CPU."""
    from .config import from_dict
    from .data.synthetic import num_outputs
    from .model import build_model

    state = load_checkpoint(path)
    cfg = from_dict(state["config"])
    model = build_model(cfg.data.task, state["num_inputs"], num_outputs(cfg.data), cfg.model)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(f"{path}: model weights do not fit its config ({str(e).splitlines()[-1].strip()})") from None
    return model, cfg, state
