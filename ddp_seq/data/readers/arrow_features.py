"""The features column of a columnar file (``data.format=parquet`` / ``hf``) as float32 rows: checked
step by step with Arrow (widths, nulls, finite values) and, for an Arrow file's float32 values, kept as
views of its memory map where the record batches allow it, so every rank of a node shares the file's
pages (see :mod:`~ddp_seq.data.readers.columnar`, which calls :func:`read_features` with its table
reader ``t``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ddp_seq.data.readers.text import offsets_of
from ddp_seq.errors import UserError


def locate(offsets: np.ndarray, step: int) -> tuple[int, int]:
    """(row, step within the row) of a flat step index; ``side='right'`` skips empty rows."""
    row = int(np.searchsorted(offsets, step, side="right")) - 1
    return row, step - int(offsets[row])


def read_features(t: Any, column: Any, name: str, shared: bool
                  ) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """``(lengths, values, view)`` of a features column: per-row steps, float32 ``[steps, width]``
    contiguous (``view`` None), or ``values`` None and ``view`` = ``(rows of the mapped region, starts)``
    when the record batches' values stay in place (``shared``: the task allows it; see the module)."""
    pa, nested = t.pa, t.is_list(column.type.value_type)
    lengths, steps = t.lists(column, name)
    width = 1
    if nested:  # a list of numbers per step: check the widths, then flatten once more
        inner = steps.type.value_type
        if not t.is_number(inner):
            raise UserError(f"{t.path} column {name!r}: holds {column.type}; features must be numbers")
        widths = np.concatenate([t.pc.list_value_length(c).to_numpy(zero_copy_only=False)
                                 for c in steps.chunks] or [np.zeros(0)]).astype(np.int64)
        if len(widths):
            width, first = int(widths[0]), locate(offsets_of(lengths), 0)[0]
            if width == 0:
                raise UserError(f"{t.at(first, name)}: step 0 is an empty list; a step needs at least one feature")
            if (widths != width).any():
                step = int(np.argmax(widths != width))
                row, within = locate(offsets_of(lengths), step)
                raise UserError(f"{t.at(row, name)}: step {within} has {widths[step]} features, but the first "
                                f"step (row {first + 1}) has {width}; every step needs the same number of features")
        parts = [c.flatten() for c in steps.chunks]
        number = inner
    else:
        parts, number = list(steps.chunks), steps.type
    if not t.is_number(number):
        raise UserError(f"{t.path} column {name!r}: holds {column.type}; features must be numbers")
    arrays, roots, done = [], [], 0
    for part in parts:
        if part.null_count:  # only nested lists get here with nulls (t.lists checked the steps)
            step, feature = divmod(done + int(np.argmax(part.is_null().to_numpy(zero_copy_only=False))), width)
            row, within = locate(offsets_of(lengths), step)
            raise UserError(f"{t.at(row, name)}: step {within} feature {feature} is null (lists must hold no nulls)")
        zero_copy = pa.types.is_float32(part.type)
        raw = part.to_numpy(zero_copy_only=zero_copy)
        with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
            values = raw if zero_copy else raw.astype(np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            flat = done + int(np.argmax(~finite))
            step, feature = divmod(flat, width)
            row, within = locate(offsets_of(lengths), step)
            value = float(raw[flat - done])
            shown = "beyond float32 range" if np.isfinite(value) else repr(value)
            raise UserError(f"{t.at(row, name)}: step {within} feature {feature} is {shown} (input values must be "
                            "finite)")
        arrays.append(values.reshape(-1, width))
        roots.append(_root(part) if zero_copy else None)
        done += len(values)
    kept = [(a, r) for a, r in zip(arrays, roots) if len(a)]
    if len(kept) <= 1:
        return lengths, kept[0][0] if kept else np.zeros((0, width), dtype=np.float32), None
    view = _region([a for a, _ in kept], [r for _, r in kept], lengths, width) if shared else None
    if view is not None:
        return lengths, None, view
    return lengths, np.concatenate(arrays), None  # a copy: the batches cannot be addressed as one array


def _root(array: Any) -> Any:
    """The outermost Arrow buffer the values of ``array`` are a slice of (a file's whole memory map)."""
    buffer = array.buffers()[1]
    while buffer is not None and buffer.parent is not None:
        buffer = buffer.parent
    return buffer


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _region(arrays: list[np.ndarray], roots: list, lengths: np.ndarray,
            width: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The record batches' value arrays as rows of one array over the buffer they all lie in, and each
    sample's first row in it; None when they are not all in one buffer, in order, whole rows apart."""
    root = roots[0]
    if root is None or any(r is None or r.address != root.address or r.size != root.size for r in roots):
        return None
    row = 4 * width
    base = _address(arrays[0])
    shifts = [_address(a) - base for a in arrays]
    end = shifts[-1] + arrays[-1].nbytes
    if any(s % row for s in shifts) or any(b < a for a, b in zip(shifts, shifts[1:])) or \
            base < root.address or base + end > root.address + root.size:
        return None
    whole = np.frombuffer(root, dtype=np.uint8)  # keeps the map alive through its base
    region = whole[base - root.address:base - root.address + end].view(np.float32).reshape(-1, width)
    # Row of each step: its batch's first row in the region plus its place within the batch.
    ends = np.cumsum([len(a) for a in arrays])
    first_rows = np.array(shifts, dtype=np.int64) // row - np.concatenate([[0], ends[:-1]])
    offsets = offsets_of(lengths)[:-1]
    nonempty = lengths > 0  # an empty sample's start is never read (and may lie past the last batch)
    starts = np.zeros(len(lengths), dtype=np.int64)
    starts[nonempty] = offsets[nonempty] + first_rows[np.searchsorted(ends, offsets[nonempty], side="right")]
    return region, starts
