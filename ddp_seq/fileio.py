"""Reading a user's file with one-line errors, and atomic writes: readers see the old file or the whole
new one, never a part (no torch here)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ddp_seq.errors import UserError, first_line


def read_bytes(path: str | Path, where: str | None = None) -> bytes:
    """The bytes of the regular file ``path``; a missing, non-regular or unreadable one is a one-line
    :class:`UserError` starting with ``where`` (default: the path)."""
    where, p = where or str(path), Path(path)
    if not p.is_file():
        raise UserError(f"{where}: no such file" if not p.exists() else f"{where}: not a regular file")
    try:
        return p.read_bytes()
    except OSError as e:
        raise UserError(f"{where}: cannot read ({e.strerror or first_line(e)})") from None


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry (a rename) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` through ``write(file)`` so that it appears whole or not at all.

    The bytes go to a temporary file in the same directory, are flushed and fsynced, and the file
    is renamed over ``path`` (atomic on POSIX); the directory is fsynced so the rename survives a
    crash. A failure leaves ``path`` as it was and removes the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """:func:`atomic_write` of ``data``; an OS error is a :class:`UserError` naming ``path``."""
    try:
        return atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


def _finite_or_none(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_text(value, **kwargs) -> str:
    """``json.dumps(value, **kwargs)`` as strict JSON: a NaN or infinite float becomes ``null``
    (Python writes ``NaN``/``Infinity``, which no JSON parser but Python's accepts). Every JSON file
    and line ddp_seq writes goes through here."""
    return json.dumps(_finite_or_none(value), allow_nan=False, **kwargs)
