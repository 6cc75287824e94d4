"""Ragged sequence storage: one array of steps plus per-sample spans -- no per-sample Python objects.

Every rank holds the whole dataset this way (a memory-mapped array is shared through the page
cache), and a subset -- a validation hold-out, a cross-validation fold, truncated sequences -- is
a *view*: new spans over the same ``values``, never a copy of the steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def as_spans(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, lengths)`` of contiguous storage described by ``offsets`` (``n + 1`` entries)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    return offsets[:-1], np.diff(offsets)


def span_steps(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The step indices covered by the spans, in order: ``concat(range(s, s + l))``, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    ends = np.cumsum(lengths)
    # Step k of span j is starts[j] + (k - ends[j] + lengths[j]): repeat the per-span shift.
    shift = np.asarray(starts, dtype=np.int64) - (ends - lengths)
    return np.repeat(shift, lengths) + np.arange(int(ends[-1]) if len(ends) else 0, dtype=np.int64)


@dataclass
class SequenceData:
    """``n`` sequences; sequence ``i`` is ``values[starts[i]:starts[i] + lengths[i]]``.

    Built from ``offsets`` (``starts = offsets[:-1]``, contiguous storage) or, for a view made by
    :meth:`select` or :meth:`with_spans`, from explicit ``starts`` and ``lengths`` (``offsets`` is
    then None). ``targets`` is per sequence (classify: int64 class, regress: float32 value) or, for
    ``per_step`` tasks (tag), per time step and indexed like ``values``. ``positions`` is each
    sample's index in its source (the input order ``predict`` writes back); ``lines`` its 1-based
    line in a text file (or row in a table, ``unit`` ``"row"``), or None; ``source`` the file (or
    ``synthetic``), for messages.
    ``input_lengths`` is each sample's length in its input before ``data.max_length`` cut it (set
    for ``predict`` input, which reports the steps a prediction covers), or None.
    """

    values: np.ndarray  # [total_steps, features] float32, or [total_steps] int64 token ids
    offsets: np.ndarray | None  # [n + 1] int64 for contiguous storage; None for a view
    targets: np.ndarray
    per_step: bool
    starts: np.ndarray | None = None  # [n] int64
    lengths: np.ndarray | None = None  # [n] int64
    positions: np.ndarray | None = None  # [n] int64; arange(n) by default
    lines: np.ndarray | None = None  # [n] int64, or None (not a text file)
    source: str = ""
    input_lengths: np.ndarray | None = None  # [n] int64, or None (not recorded)
    unit: str = "line"  # what ``lines`` counts, for messages: "line" (text files) or "row" (Parquet, Arrow)

    def __post_init__(self) -> None:
        if self.starts is None:
            self.starts, self.lengths = as_spans(self.offsets)
        if self.positions is None:
            self.positions = np.arange(len(self.lengths), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_features(self) -> int:
        return 0 if self.values.ndim == 1 else self.values.shape[1]

    @property
    def total_steps(self) -> int:
        return int(self.lengths.sum())

    def where(self, i: int) -> str:
        """Where sample ``i`` comes from, for messages: ``path line 7`` (``path row 7``) or ``path: sample 3``."""
        if self.lines is not None:
            return f"{self.source} {self.unit} {int(self.lines[i])}"
        return f"{self.source}: sample {int(self.positions[i])}"

    def with_spans(self, starts: np.ndarray, lengths: np.ndarray) -> SequenceData:
        """The same samples with new spans over the same storage (e.g. truncated sequences)."""
        return SequenceData(self.values, None, self.targets, self.per_step, np.asarray(starts, dtype=np.int64),
                            np.asarray(lengths, dtype=np.int64), self.positions, self.lines, self.source,
                            self.input_lengths, self.unit)

    def select(self, indices: np.ndarray) -> SequenceData:
        """A view of the samples ``indices`` (in that order); steps are shared, not copied."""
        indices = np.asarray(indices, dtype=np.int64)
        targets = self.targets if self.per_step else self.targets[indices]
        return SequenceData(self.values, None, targets, self.per_step, self.starts[indices], self.lengths[indices],
                            self.positions[indices], None if self.lines is None else self.lines[indices], self.source,
                            None if self.input_lengths is None else self.input_lengths[indices], self.unit)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | int | float]:
        """``(steps, target)`` of sample ``i``: a view of its steps (``[T, F]`` or ``[T]``) and its
        target (a scalar, or ``[T]`` per-step targets) -- the item :func:`~ddp_seq.data.collate.collate` pads."""
        s, n = int(self.starts[i]), int(self.lengths[i])
        return self.values[s:s + n], self.targets[s:s + n] if self.per_step else self.targets[i]
