"""Text formats: ``label<TAB>text`` lines (TSV) and one JSON object per line (JSONL).

Both produce a :class:`~ddp_seq.data.readers.encoding.Parsed`: file-local ids for tokens and labels, float32
feature rows, ``offsets`` over the steps and the 1-based line of every sample. Every problem is a
:class:`UserError` of one line that starts with the path (and names the line when one is at fault).

Files are decoded as strict UTF-8 and split at the three line endings ``\\n`` (Unix), ``\\r\\n``
(Windows) and a lone ``\\r`` (old Mac "Text" exports), mixed within one file too -- and at nothing
else: ``str.splitlines`` would also split on ``\\x0b``, ``\\x1c`` or ``\\u2028``, which may occur inside
a text. Blank lines are not samples, but they count for line numbers so that messages point at the
line an editor shows. Every reader here and in :mod:`~ddp_seq.data.readers.uea` (training, validation and
``predict`` input alike) gets its lines from :func:`read_lines`.
"""

from __future__ import annotations

import json
import math
from itertools import chain
from typing import Any

import numpy as np

from ddp_seq.data.readers.encoding import Parsed, intern_all
from ddp_seq.data.readers.sequences import SequenceData
from ddp_seq.data.readers.tokenizers import SubwordTokenizer, text_tokenizer
from ddp_seq.data.readers.tsv_layout import clip, tsv_layout
from ddp_seq.errors import UserError, first_line
from ddp_seq.fileio import read_bytes

TASKS = ("classify", "regress", "tag")
_F32_MAX = float(np.finfo(np.float32).max)
_NUMBER = {int, float}  # JSON numbers; bool is a different type, so True/False never pass as numbers


def split_lines(text: str) -> list[str]:
    """``text`` cut at ``\\r\\n``, ``\\r`` and ``\\n`` -- only those: other Unicode separators stay in the line.

    Like ``str.split``, a text ending in a line break gives a last, empty element.
    """
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


def line_at(raw: bytes, pos: int) -> tuple[int, int]:
    """``(line, column)``, both 1-based, of byte ``pos`` of ``raw`` under the endings of :func:`split_lines`.

    The column counts bytes from the start of the line.
    """
    before = raw[:pos]
    line = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
    start = max(before.rfind(b"\n"), before.rfind(b"\r")) + 1
    return line, pos - start + 1


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file: BOM dropped, split by :func:`split_lines` (``\\n``, ``\\r\\n``, ``\\r``).

    Line ``k`` (1-based) of the file is element ``k - 1``; blank lines are kept so numbering holds.
    """
    raw = read_bytes(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = line_at(raw, e.start)
        raise UserError(f"{path} line {line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{column}); save the file as UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return split_lines(text)


def check_task(path: str, task: str, fmt: str) -> None:
    """Refuse tasks a format cannot hold: ``tag`` needs a label per step, which only JSONL carries."""
    if task not in TASKS:
        raise UserError(f"{path}: unknown task {task!r} (expected one of {', '.join(TASKS)})")
    if task == "tag" and fmt != "jsonl":
        raise UserError(f"{path}: task tag needs one label per step, but {fmt} files hold one label per "
                        "sample; write the data as jsonl with a 'tags' list per line")


def int_ids(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, distinct)`` of integer ``codes`` with ``distinct[ids] == codes``, ``distinct`` ascending.

    A dense lookup table when the values span a modest range (code points, typical token ids): one
    O(n) pass instead of the sort inside ``np.unique``, which dominates on tens of millions of steps.
    """
    if not len(codes):
        return np.zeros(0, dtype=np.int64), codes[:0]
    lo, hi = int(codes.min()), int(codes.max())
    if hi - lo > max(1 << 21, 4 * len(codes)):
        distinct, ids = np.unique(codes, return_inverse=True)
        return ids.reshape(-1).astype(np.int64, copy=False), distinct
    shifted = (codes - lo).astype(np.intp, copy=False)
    present = np.flatnonzero(np.bincount(shifted))
    lookup = np.zeros(int(present[-1]) + 1, dtype=np.int64)
    lookup[present] = np.arange(len(present))
    return lookup[shifted], present + lo


def _char_ids(texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """Every character of ``texts`` (concatenated) as an id, vectorised over code points."""
    ids, distinct = int_ids(np.frombuffer("".join(texts).encode("utf-32-le"), dtype=np.uint32))
    return ids, [chr(c) for c in distinct]


def offsets_of(lengths: list[int]) -> np.ndarray:
    """``[0, cumsum(lengths)]`` as int64."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def finite_target(where: str, value: float, text: Any) -> float:
    """``value`` if it is finite and fits float32 (regress targets are stored as float32)."""
    if not math.isfinite(value) or abs(value) > _F32_MAX:
        raise UserError(f"{where}: target {text!r} is not a finite number within float32 range")
    return value


def targets_of(task: str, labelled: bool, labels: list, n: int, total: int) -> tuple[np.ndarray, list | None]:
    """``(targets, label_symbols)`` of a parsed file from its raw ``labels`` (one per sample, or per
    step for tag): interned ids (classify, tag), float32 values (regress), or zeros for ``predict``
    input (``labelled=False``: per step for tag, float32 for regress)."""
    if not labelled:
        return np.zeros(total if task == "tag" else n, dtype=np.float32 if task == "regress" else np.int64), None
    if task == "regress":
        return np.array(labels, dtype=np.float32), None
    return intern_all(labels)


def tokenize_texts(path: str, texts: list[str],
                   tokenizer: str | SubwordTokenizer) -> tuple[np.ndarray, list, list[int]]:
    """``(ids, symbols, lengths)`` of ``texts`` cut into tokens by ``tokenizer`` (``data.tokenizer``).

    ``ids`` (int64, all texts' tokens concatenated) index ``symbols`` (file-local, see
    :func:`~ddp_seq.data.readers.encoding.intern_all`); ``lengths[k]`` is the number of tokens of ``texts[k]``.
    ``char``: every character; ``whitespace``: ``str.split()`` words; a
    :class:`~ddp_seq.data.readers.tokenizers.SubwordTokenizer` (or the path of a ``.json`` / ``.model`` file,
    loaded once per process): its own token ids, ascending, are the symbols (no special tokens added).
    ``path`` names the file in errors.
    """
    if isinstance(tokenizer, str):
        tokenizer = text_tokenizer(tokenizer)  # a tokenizer file's name: the loaded file
    if isinstance(tokenizer, SubwordTokenizer):
        codes, lengths = tokenizer.encode_batch(texts)
        values, distinct = int_ids(codes)
        return values, distinct.tolist(), lengths.tolist()
    if tokenizer == "char":
        values, symbols = _char_ids(texts)
        return values, symbols, [len(t) for t in texts]
    if tokenizer == "whitespace":
        words = [t.split() for t in texts]
        values, symbols = intern_all(list(chain.from_iterable(words)))
        return values, symbols, [len(w) for w in words]
    raise UserError(f"{path}: unknown tokenizer {tokenizer!r} (expected char, whitespace or a tokenizer file)")


def read_tsv(path: str, *, task: str, tokenizer: str | SubwordTokenizer, labelled: bool = True,
             header: str = "auto", classes: list | None = None) -> Parsed:
    """Read ``label<TAB>text`` lines; text becomes characters (``char``), words (``whitespace``) or
    subword ids (:func:`tokenize_texts`).

    The label is everything before the first tab (stripped); the text is the rest, further tabs
    included. The file's structure is decided first, for all its lines
    (:func:`~ddp_seq.data.readers.tsv_layout.tsv_layout`): a header line (``header``: ``data.header``),
    swapped columns, and for ``labelled=False`` (``predict`` input) that every text before a tab is
    a label the model knows (the label column is optional, and ignored). ``classes``: the training
    data's classes when this file is read after them (validation, evaluation, predict input). A
    skipped header is in the result's ``notes``.
    """
    check_task(path, task, "tsv")
    rows = [(number, *line.partition("\t")) for number, line in enumerate(read_lines(path), 1) if line]
    layout = tsv_layout(path, rows, task=task, labelled=labelled, header=header, classes=classes)
    texts: list[str] = []
    labels: list[Any] = []
    numbers: list[int] = []
    for number, label, tab, text in rows[1:] if layout.header else rows:
        if not tab:
            if labelled:
                raise UserError(f"{path} line {number}: no tab: lines are label<TAB>text")
            text = label  # predict input may leave the label column out: the line is the text
        elif labelled:
            label = label.strip()
            if not label:
                raise UserError(f"{path} line {number}: empty label before the tab (lines are label<TAB>text)")
            if task == "regress":
                try:
                    value = float(label)
                except ValueError:
                    raise UserError(f"{path} line {number}: label {clip(label)} is not a number (task regress needs "
                                    f"a numeric label){_swapped_hint(text)}") from None
                labels.append(finite_target(f"{path} line {number}", value, label))
            else:
                labels.append(label)
        texts.append(text)
        numbers.append(number)
    values, symbols, lengths = tokenize_texts(path, texts, tokenizer)
    offsets = offsets_of(lengths)
    targets, label_symbols = targets_of(task, labelled, labels, len(texts), int(offsets[-1]))
    data = SequenceData(values, offsets, targets, False, lines=np.array(numbers, dtype=np.int64), source=path)
    return Parsed(data, symbols, label_symbols, labelled, [layout.note] if layout.note else [])


def _swapped_hint(text: str) -> str:
    """For a regress label that is no number: say so when the text field is one (text<TAB>label lines)."""
    try:
        float(text)
    except ValueError:
        return ""
    return f"; the text {clip(text.strip())} is one: the columns look swapped (lines are label<TAB>text)"


def _kind(values: list) -> str | None:
    """``'string'`` or ``'integer'`` when every element is one of them (never bool), else None."""
    types = set(map(type, values))
    return "string" if types == {str} else "integer" if types == {int} else None


def _mixed(where: str, key: str, values: list) -> None:
    """Raise for a list that is not all strings or all integers: name an odd entry, or the mix."""
    bad = [v for v in values if type(v) not in (str, int)]
    holds = f"holds {json.dumps(bad[0])}" if bad else "mixes strings and integers"
    raise UserError(f"{where}: '{key}' {holds}; {key} must be all strings or all integers")


class _JsonlReader:
    """The per-file state of :func:`read_jsonl`: the input key, kinds and width fixed by the first lines."""

    def __init__(self, path: str, task: str, labelled: bool) -> None:
        self.path, self.task, self.labelled = path, task, labelled
        self.input: str | None = None  # "tokens" or "features", from the first sample
        self.kinds: dict[str, tuple[str, int]] = {}  # what -> (kind, line that fixed it)
        self.width: tuple[int, int] | None = None  # (features per step, line that fixed it)
        self.steps: list = []  # tokens (flat) or float32 arrays [length, width], per line
        self.lengths: list[int] = []
        self.labels: list = []  # classify: one per sample; tag: flat per step; regress: floats
        self.lines: list[int] = []

    def same_kind(self, where: str, what: str, kind: str, number: int) -> None:
        """Hold every line to the kind (strings or integers) of ``what`` that the first one used."""
        first, line = self.kinds.setdefault(what, (kind, number))
        if kind != first:
            raise UserError(f"{where}: {what} are {kind}s, but line {line} has {first}s; use one kind "
                            "throughout the file")

    def add(self, number: int, obj: Any) -> None:
        where = f"{self.path} line {number}"
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object ({{...}}), got {type(obj).__name__}")
        present = [key for key in ("tokens", "features") if key in obj]
        if len(present) != 1:
            raise UserError(f"{where}: needs exactly one of the keys 'tokens' or 'features'"
                            f" ({'both are' if present else 'neither is'} present)")
        key = present[0]
        if self.input is None:
            self.input = key
        elif key != self.input:
            raise UserError(f"{where}: has '{key}', but earlier lines have '{self.input}'; use one input kind "
                            "throughout the file")
        length = (self.add_tokens if key == "tokens" else self.add_features)(where, number, obj[key])
        if self.labelled:
            self.add_label(where, number, obj, length)
        self.lengths.append(length)
        self.lines.append(number)

    def add_tokens(self, where: str, number: int, tokens: Any) -> int:
        if not isinstance(tokens, list):
            raise UserError(f"{where}: 'tokens' must be a list of strings or integers, got {type(tokens).__name__}")
        if tokens:
            kind = _kind(tokens)
            if kind is None:
                _mixed(where, "tokens", tokens)
            self.same_kind(where, "tokens", kind, number)
            if kind == "integer" and (max(tokens) >= 2**63 or min(tokens) < -(2**63)):
                raise UserError(f"{where}: a token id is beyond the 64-bit integer range")
            self.steps.extend(tokens)
        return len(tokens)

    def add_features(self, where: str, number: int, features: Any) -> int:
        if not isinstance(features, list):
            raise UserError(f"{where}: 'features' must be a list of steps, got {type(features).__name__}")
        if not features:
            return 0
        types = set(map(type, features))
        if types <= _NUMBER:
            widths = [1] * len(features)  # one feature per step
        elif types == {list}:
            widths = list(map(len, features))
            inner = set(map(type, chain.from_iterable(features)))
            if not inner <= _NUMBER:
                step, bad = next((s, v) for s, row in enumerate(features) for v in row if type(v) not in _NUMBER)
                raise UserError(f"{where}: step {step} of 'features' holds {json.dumps(bad)}; features must be "
                                "numbers")
        else:
            step = next(s for s, row in enumerate(features) if type(row) is not list)
            raise UserError(f"{where}: step {step} of 'features' is {json.dumps(features[step])}; steps are all "
                            "numbers (one feature each) or all lists of numbers")
        if self.width is None:
            if widths[0] == 0:
                raise UserError(f"{where}: step 0 of 'features' is an empty list; a step needs at least one feature")
            self.width = (widths[0], number)
        width, line = self.width
        if any(w != width for w in widths):
            step = next(s for s, w in enumerate(widths) if w != width)
            raise UserError(f"{where}: step {step} has {widths[step]} features, but the first step (line {line}) "
                            f"has {width}; every step needs the same number of features")
        try:
            rows = np.array(features, dtype=np.float64).reshape(len(features), width)
        except OverflowError:
            raise UserError(f"{where}: a feature value is too large for a float") from None
        with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
            values = rows.astype(np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            step, feature = np.argwhere(~finite)[0]
            value = rows[step, feature]
            shown = "beyond float32 range" if math.isfinite(value) else json.dumps(float(value))
            raise UserError(f"{where}: step {step} feature {feature} is {shown} (input values must be finite)")
        self.steps.append(values)
        return len(features)

    def add_label(self, where: str, number: int, obj: dict, length: int) -> None:
        key = {"classify": "label", "regress": "target", "tag": "tags"}[self.task]
        if key not in obj:
            raise UserError(f"{where}: no '{key}' key (task {self.task} needs it on every line)")
        value = obj[key]
        if self.task == "regress":
            if type(value) not in _NUMBER:
                raise UserError(f"{where}: 'target' is {json.dumps(value)}; task regress needs a number")
            # float() of an integer beyond 1e308 raises instead of giving inf: same verdict either way.
            self.labels.append(finite_target(where, float(value) if abs(value) < 1e308 else math.inf, value))
        elif self.task == "classify":
            kind = _kind([value])
            if kind is None:
                raise UserError(f"{where}: 'label' is {json.dumps(value)}; a label is a string or an integer")
            self.same_kind(where, "labels", kind, number)
            if kind == "integer" and value < 0:
                raise UserError(f"{where}: 'label' is {value}; integer labels are class indices (>= 0)")
            self.labels.append(value)
        else:
            if not isinstance(value, list):
                raise UserError(f"{where}: 'tags' must be a list with one tag per step, got {type(value).__name__}")
            if len(value) != length:
                raise UserError(f"{where}: 'tags' has {len(value)} entries, but the input has {length} steps; "
                                "give one tag per step")
            if value:
                kind = _kind(value)
                if kind is None:
                    _mixed(where, "tags", value)
                self.same_kind(where, "tags", kind, number)
                if kind == "integer" and min(value) < 0:
                    raise UserError(f"{where}: 'tags' holds {min(value)}; integer tags are class indices (>= 0)")
                self.labels.extend(value)

    def result(self) -> Parsed:
        offsets = offsets_of(self.lengths)
        n, total = len(self.lengths), int(offsets[-1])
        token_symbols = None
        if self.input == "features":
            values = np.concatenate(self.steps) if self.steps else np.zeros((0, 1), dtype=np.float32)
        elif self.kinds.get("tokens", ("string",))[0] == "integer":
            values, distinct = int_ids(np.array(self.steps, dtype=np.int64))
            token_symbols = distinct.tolist()
        else:
            values, token_symbols = intern_all(self.steps)
        targets, label_symbols = targets_of(self.task, self.labelled, self.labels, n, total)
        data = SequenceData(values, offsets, targets, self.task == "tag", lines=np.array(self.lines, dtype=np.int64),
                            source=self.path)
        return Parsed(data, token_symbols, label_symbols, self.labelled)


def read_jsonl(path: str, *, task: str, labelled: bool = True) -> Parsed:
    """Read one JSON object per line: ``tokens`` or ``features``, and ``label``/``target``/``tags`` by task.

    ``tokens``: strings or integer ids; ``features``: per-step lists of numbers (or one number per
    step). Other keys are ignored. ``labelled=False``: the label keys are optional and ignored.
    """
    check_task(path, task, "jsonl")
    reader = _JsonlReader(path, task, labelled)
    for number, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: invalid JSON (column {e.colno}: {e.msg})") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of more than 4300 digits, absurd nesting
            raise UserError(f"{path} line {number}: invalid JSON ({first_line(e)})") from None
        reader.add(number, obj)
    if reader.input is None:
        reader.input = "tokens"  # no samples: an empty token file
    return reader.result()
