"""What the lines of a TSV file are, decided for the whole file before any line is read as a sample.

Three structures a ``label<TAB>text`` file may have that no single line shows (issue 26, row 8 and
what was found with it):

* **A header line** (``label<TAB>text``), as pandas' and Hugging Face's csv loaders expect by
  default. ``data.header``: ``true`` skips the first line, ``false`` reads it as a sample, ``auto``
  (the default) skips it when its label field names a column (:data:`HEADER_WORDS`: ``label``,
  ``class``, ``sentiment``, ... or such a text field: ``text``, ``sentence``, ...) and is not a label
  of any other line nor a class of the training data; a skipped header is said in the log. Where a
  first line looks like neither (a training file: its label occurs on no other line while every
  other label occurs twice or more; a validation, evaluation or predict file: its label is no class
  of the training data), it is refused naming line 1, so a header never silently becomes a class.
* **A label column in ``predict`` input.** Each line may carry a label before a tab or not, and a
  text may hold a tab too. A tab ends a label column only where the text before it is a label the
  model knows (a class; a number for regress) or empty; a line whose text before its first tab is
  anything else is refused naming the line, instead of silently predicting on the words after the
  tab. A line without a tab is all text. (A text with a tab: start its line with a tab.)
* **Swapped columns** (``text<TAB>label``): nearly every label distinct while the texts repeat a few
  values. Refused with one line that says so, showing a few examples and the counts.

JSONL has keys instead of columns and UEA ``.ts`` its own ``@`` header, so neither has these questions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ddp_seq.errors import UserError

#: Column names that a header line's label or text field is taken to be (case-insensitive).
HEADER_WORDS = frozenset(
    "label labels class classes category categories target targets tag tags sentiment polarity intent topic "
    "score rating value text texts sentence sentences review reviews content document body input inputs tokens "
    "question title comment message".split())

#: A row of the file: ``(line number, field before the first tab, the tab or '', the rest)``.
Row = tuple[int, str, str, str]


@dataclass
class Layout:
    """The structure :func:`tsv_layout` found: skip the first row; a note to log."""

    header: bool
    note: str = ""


def clip(text: str, limit: int = 30) -> str:
    """``repr(text)`` cut to ``limit`` characters (with ``...``), for one-line messages."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit - 4] + "...'"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def tsv_layout(path: str, rows: list[Row], *, task: str, labelled: bool, header: str,
               classes: list | None) -> Layout:
    """The :class:`Layout` of a TSV file's non-blank ``rows``; raises :class:`UserError` (one line naming
    the file and line) where a structure is ambiguous or the columns look swapped.

    ``header``: ``data.header`` (``auto``, ``true``, ``false``). ``classes``: the training data's classes
    when this file is read after them (validation, evaluation, ``predict`` input), else None.
    ``labelled=False`` (``predict`` input): the label column is optional and decided here.
    """
    if not rows:
        return Layout(False)
    if labelled and task == "classify":
        _refuse_swapped(path, rows)
    skip = _header(path, rows, task, labelled, header, classes)
    note = f"{path}: line {rows[0][0]} is a header ({rows[0][1].strip()!r}), not a sample: skipped " \
           "(data.header=auto; set data.header=false to read it as a sample)" if skip and header == "auto" else ""
    if not labelled:
        _check_label_fields(path, rows[1:] if skip else rows, task, classes)
    return Layout(skip, note)


def _refuse_swapped(path: str, rows: list[Row]) -> None:
    """Refuse ``text<TAB>label`` lines: labels (nearly) all distinct while the texts repeat a few values."""
    labels = Counter(label.strip() for _, label, tab, _ in rows if tab)
    texts = Counter(text.strip() for _, _, tab, text in rows if tab)
    n = sum(labels.values())
    if n >= 8 and len(labels) > n / 2 and len(texts) <= len(labels) / 4:
        common = ", ".join(clip(t, 20) for t, _ in texts.most_common(3))
        raise UserError(f"{path}: the columns look swapped: {len(labels)} distinct labels in {n} lines (e.g. "
                        f"{clip(rows[0][1].strip())}), but the texts hold only {len(texts)} distinct values "
                        f"({common}{', ...' if len(texts) > 3 else ''}); lines are label<TAB>text")


def _header(path: str, rows: list[Row], task: str, labelled: bool, header: str, classes: list | None) -> bool:
    """Whether the first row is a header line (see the module)."""
    if header != "auto":
        return header == "true"
    number, first, tab, text = rows[0]
    name = first.strip()
    if not tab or not name:
        return False  # no label field to judge
    named = name.lower() in HEADER_WORDS or text.strip().lower() in HEADER_WORDS
    ask = f"is line {number} a header? set data.header=true to skip it, or data.header=false to read it as a sample"
    if task == "regress":
        if _is_number(name):
            return False
        if named:
            return True
        if labelled:
            raise UserError(f"{path} line {number}: label {clip(name)} is not a number (task regress needs a numeric "
                            f"label); {ask}")
        return False  # predict input: the label-column rule judges it
    if classes is not None:  # classes known: the training data's
        if name in {str(c) for c in classes}:
            return False
        if named:
            return True
        if labelled:
            raise UserError(f"{path} line {number}: label {clip(name)} is no class of the training data; {ask}")
        return False
    others = Counter(label.strip() for _, label, tab, _ in rows[1:] if tab)
    if name in others:
        return False
    if named:
        return True
    if len(rows) >= 10 and min(others.values(), default=0) >= 2:
        raise UserError(f"{path} line {number}: label {clip(name)} occurs on no other line, while every other label "
                        f"occurs at least twice; {ask}")
    return False


def _check_label_fields(path: str, rows: list[Row], task: str, classes: list | None) -> None:
    """``predict`` input: refuse a line whose tab does not end a label (see the module)."""
    known = None if task == "regress" or classes is None else {str(c) for c in classes}
    what = "a number" if task == "regress" else "a class of the model"
    for number, first, tab, _ in rows:
        name = first.strip()
        if tab and name and (not _is_number(name) if task == "regress" else known is not None and name not in known):
            raise UserError(f"{path} line {number}: the text before the tab, {clip(name)}, is not {what}, so it is "
                            "no label column; to predict on a text that holds a tab, start its line with a tab (an "
                            "empty label), or replace the tab")
