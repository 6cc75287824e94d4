"""Vocabularies and label sets: the symbols of a file -> the integer ids the model sees.

Parsers intern every token and label they read into *file-local* ids (in order of first
occurrence, :func:`intern_all`), so a file becomes integer arrays while it is read and no per-token Python object
outlives parsing. An :class:`Encoding` -- the vocabulary and the classes, built from the training
samples only, in a deterministic order, so every rank builds the same one on its own -- then maps
those ids in one vectorised lookup. The encoding is stored in every checkpoint: ``evaluate`` and
``predict`` encode new files exactly as training did, with nothing else needed.

Labels: integers (NPZ arrays, JSON numbers) are class *indices*, so the classes are
``0..largest training label``; text labels (TSV, ``.ts``, JSON strings) are *names*, and the classes
are the distinct training labels, sorted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ddp_seq.data.readers.sequences import SequenceData, span_steps
from ddp_seq.errors import UserError

PAD, UNK = 0, 1  # token ids: padding (the Embedding's padding_idx) and tokens the vocabulary lacks
SPECIALS = ("<pad>", "<unk>")


def intern_all(symbols: list) -> tuple[np.ndarray, list]:
    """``(ids, distinct)`` with ``distinct[ids[k]] == symbols[k]``, ids in order of first occurrence.

    Dictionary work in C (``dict.fromkeys``, ``map``) rather than a Python loop: it runs per token.
    """
    index: dict[Any, int] = dict.fromkeys(symbols)
    for i, key in enumerate(index):
        index[key] = i
    ids = np.fromiter(map(index.__getitem__, symbols), dtype=np.int64, count=len(symbols))
    return ids, list(index)


@dataclass
class Parsed:
    """A file read but not yet encoded.

    ``data.values`` holds float32 features, or int64 ids into ``token_symbols``. ``data.targets``
    holds int64 ids into ``label_symbols`` (classify, tag), float32 values (regress, where
    ``label_symbols`` is None), or zeros when the file is not ``labelled`` (``predict`` input).
    """

    data: SequenceData
    token_symbols: list | None  # None: the steps are feature vectors
    label_symbols: list | None
    labelled: bool = True
    notes: list[str] = field(default_factory=list)  # what the reader decided, for the log (a skipped header)


@dataclass
class Encoding:
    """What turns a file into model inputs and outputs back into labels; stored in checkpoints."""

    vocab: list | None = None  # token id -> token (vocab[0] = '<pad>', vocab[1] = '<unk>'); None: features
    classes: list | None = None  # class id -> label (name or index); None for regress
    num_features: int = 0  # width of a feature step; 0 for token inputs
    # data.tokenizer's subword tokenizer (SubwordTokenizer.state_dict(): its kind and serialized
    # content), so evaluate and predict cut text as training did without the file; None: char,
    # whitespace or no text. Default None: checkpoints written before it existed still load.
    tokenizer: dict | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) if self.vocab is not None else 0

    def num_outputs(self, task: str) -> int:
        """Width of the model's head: classes (classify, tag) or 1 (regress)."""
        return 1 if task == "regress" else len(self.classes)

    def state_dict(self) -> dict[str, Any]:
        """Plain lists, ints and None: a ``weights_only`` checkpoint takes them."""
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Encoding:
        return cls(**state)


def _symbol_order(symbol: Any) -> tuple[bool, Any]:
    return isinstance(symbol, str), symbol  # parsers keep one kind per file; this never compares int with str


def _is_index(symbol: Any) -> bool:
    return isinstance(symbol, (int, np.integer)) and not isinstance(symbol, bool)


def _target_steps(data: SequenceData) -> np.ndarray:
    """Indices into ``data.targets`` of the samples' targets: their steps (tag) or the samples."""
    return span_steps(data.starts, data.lengths) if data.per_step else np.arange(len(data))


def build_encoding(parsed: Parsed, train: np.ndarray, task: str, min_freq: int = 1) -> Encoding:
    """The vocabulary and classes of the samples ``train`` of ``parsed`` (counts from those samples only).

    Vocabulary: ``<pad>``, ``<unk>``, then every token seen at least ``min_freq`` times, most frequent
    first (ties by the token itself), so the order is the same on every rank and in every run.
    """
    data = parsed.data.select(train)
    vocab = None
    if parsed.token_symbols is not None:
        counts = np.bincount(data.values[span_steps(data.starts, data.lengths)],
                             minlength=len(parsed.token_symbols))
        kept = np.flatnonzero(counts >= max(1, min_freq))
        symbols = parsed.token_symbols
        kept = sorted(kept, key=lambda j: (-counts[j], _symbol_order(symbols[j])))
        vocab = [*SPECIALS, *(symbols[j] for j in kept)]
    classes = None
    if task != "regress":
        present = [parsed.label_symbols[j] for j in np.unique(data.targets[_target_steps(data)])]
        if present and all(_is_index(s) for s in present):
            classes = list(range(max(2, int(max(present)) + 1)))
        else:
            classes = sorted(present, key=_symbol_order)
            if len(classes) < 2:
                raise UserError(f"{data.source}: the training data holds only the {'tag' if task == 'tag' else 'label'}"
                                f" {classes[0]!r} (at least two classes are needed)" if classes else
                                f"{data.source}: the training data has no samples")
    return Encoding(vocab, classes, 0 if vocab is not None else parsed.data.num_features)


def _shown(classes: list, limit: int = 5, width: int = 30) -> str:
    """The first ``limit`` classes, each cut to ``width`` characters, and their count: one short line
    even when the "classes" are texts (a file whose columns are swapped)."""
    head = ", ".join(_clip(repr(c), width) for c in classes[:limit])
    return head + (f", ... ({len(classes)} in all)" if len(classes) > limit else "")


def _clip(shown: str, width: int) -> str:
    return shown if len(shown) <= width else shown[:width - 4] + "...'"


def encode(parsed: Parsed, encoding: Encoding, task: str, check: np.ndarray | None = None, *,
           lacking: str = "the training data", advice: str = "") -> SequenceData:
    """``parsed`` in model ids: tokens through the vocabulary (unknown -> ``<unk>``), labels to class ids.

    ``check``: the samples whose labels must be classes of ``encoding`` (validation or evaluation
    data); the first that is not is a :class:`UserError` naming its file and line, ``lacking`` (what
    the classes were built from: ``the training data``, or the training part of the same file for a
    hold-out or a fold) and ``advice`` (what to do; may be empty). Labels of other samples that are
    unknown become -1 (the training part of the same file has none by construction).
    """
    data = parsed.data
    if (parsed.token_symbols is None) != (encoding.vocab is None):
        holds, reads = ("tokens", "feature vectors") if encoding.vocab is None else ("feature vectors", "tokens")
        raise UserError(f"{data.source}: the file holds {holds}, but the model reads {reads}")
    values = data.values
    if encoding.vocab is not None:
        index = {token: i for i, token in enumerate(encoding.vocab) if i >= len(SPECIALS)}
        lookup = np.fromiter((index.get(s, UNK) for s in parsed.token_symbols), dtype=np.int64,
                             count=len(parsed.token_symbols))
        values = lookup[values] if len(lookup) else values.astype(np.int64)
    elif data.num_features != encoding.num_features:
        raise UserError(f"{data.source}: steps have {data.num_features} features, but the model was trained on "
                        f"{encoding.num_features}")
    targets = data.targets
    if not parsed.labelled:
        targets = np.zeros(len(values) if data.per_step else len(data), dtype=np.float32 if task == "regress"
                           else np.int64)
    elif task != "regress":
        targets = _class_lookup(parsed.label_symbols, encoding.classes)[targets] if len(targets) else targets
        if check is not None:
            _check_known(data, check, targets, parsed.label_symbols, encoding.classes, task, lacking, advice)
    return SequenceData(values, data.offsets, targets, data.per_step, data.starts, data.lengths, data.positions,
                        data.lines, data.source, unit=data.unit)


def _class_lookup(symbols: list, classes: list) -> np.ndarray:
    """File-local label id -> class id (-1 where the label is not a class)."""
    if classes and _is_index(classes[0]):
        return np.array([int(s) if _is_index(s) and 0 <= s < len(classes) else -1 for s in symbols] or [0],
                        dtype=np.int64)
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(s, -1) for s in symbols] or [0], dtype=np.int64)


def _check_known(data: SequenceData, check: np.ndarray, targets: np.ndarray, symbols: list, classes: list,
                 task: str, lacking: str = "the training data", advice: str = "") -> None:
    """Raise for the first sample of ``check`` whose label (``targets``: class ids, -1 unknown) is not a class."""
    view = data.select(check)
    where = span_steps(view.starts, view.lengths) if view.per_step else np.asarray(check, dtype=np.int64)
    bad = targets[where] < 0
    if not bad.any():
        return
    first = int(np.argmax(bad))
    sample = int(np.searchsorted(np.cumsum(view.lengths), first, side="right")) if view.per_step else first
    label = symbols[int(data.targets[where[first]])]
    kind = "tag" if task == "tag" else "label"
    then = f"; {advice}" if advice else ""
    raise UserError(f"{view.where(sample)} has {kind} {_clip(repr(label), 40)}, which {lacking} does not have "
                    f"(classes: {_shown(classes)}; {int(bad.sum())} unknown in all){then}")
