"""UEA/UCR time-series archive files (``.ts``, the sktime / timeseriesclassification.com format).

A header of ``@keyword value`` lines, then ``@data`` and one case per line: the dimensions separated
by ``:``, each a comma-separated series, and -- when ``@classLabel true`` or ``@targetLabel true`` --
the class label or regression target as the last field::

    @problemName BasicMotions
    @univariate false
    @dimensions 6
    @classLabel true Standing Running Walking Badminton
    @data
    -0.74,0.52,...:0.1,0.2,...:...:Standing

Lines are those of :func:`~ddp_seq.data.readers.text.read_lines`, as for TSV and JSONL: UTF-8, ending in
``\\n``, ``\\r\\n`` or a lone ``\\r`` (mixed too). Each case becomes one sample of float32 steps
``[length, dimensions]``. Every problem is a :class:`UserError` of one line that starts with the path
(and names the line when one is at fault).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ddp_seq.data.readers.encoding import Parsed
from ddp_seq.data.readers.sequences import SequenceData
from ddp_seq.data.readers.text import check_task, finite_target, offsets_of, read_lines, targets_of
from ddp_seq.errors import UserError

MISSING = ("error", "zero", "ffill")
_MISSING_TEXT = {"?", "nan", "NaN"}  # '?' is the archive's marker; some files write NaN
_BOOLEAN_KEYS = ("timestamps", "missing", "univariate", "equallength", "targetlabel")
_INTEGER_KEYS = ("dimensions", "serieslength")
_KEYWORDS = ("problemname", "classlabel", "data", *_BOOLEAN_KEYS, *_INTEGER_KEYS)


@dataclass
class _Header:
    """What the header declares; None where it says nothing."""

    flags: dict[str, bool] = field(default_factory=dict)
    numbers: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (value, line)
    classes: list[str] | None = None  # @classLabel true's names; None: no class labels
    class_line: int = 0


def _header_line(path: str, number: int, line: str, header: _Header) -> str:
    """Record one ``@keyword value`` line (keywords are case-insensitive); returns the keyword, lowercase."""
    where = f"{path} line {number}"
    keyword, rest = (line[1:].split(None, 1) + ["", ""])[:2]
    key, words = keyword.lower(), rest.split()
    key = "dimensions" if key == "dimension" else key  # some writers use the singular
    if key not in _KEYWORDS:
        raise UserError(f"{where}: unknown header keyword @{keyword} (known: @problemName, @timeStamps, "
                        "@missing, @univariate, @dimensions, @equalLength, @seriesLength, @classLabel, "
                        "@targetLabel, @data)")
    if key in ("problemname", "data"):
        return key
    value = words[0].lower() if words else ""
    if key in _INTEGER_KEYS:
        if len(words) != 1 or not value.isdigit():
            raise UserError(f"{where}: @{keyword} needs a whole number, got {rest.strip()!r}")
        header.numbers[key] = (int(value), number)
        return key
    if value not in ("true", "false") or (len(words) != 1 and key != "classlabel"):
        raise UserError(f"{where}: @{keyword} must be true or false, got {rest.strip()!r}")
    if key == "classlabel":
        if value == "true" and len(words) == 1:
            raise UserError(f"{where}: @classLabel true must list the class names (@classLabel true A B C)")
        if value == "false" and len(words) > 1:
            raise UserError(f"{where}: @classLabel false takes no class names")
        header.classes, header.class_line = (words[1:] if value == "true" else None), number
        return key
    if key == "timestamps" and value == "true":
        raise UserError(f"{where}: timestamped series (@timeStamps true) are not supported; write the values "
                        "without timestamps")
    header.flags[key] = value == "true"
    return key


def _series(where: str, dim: int, text: str, missing: str) -> np.ndarray:
    """One dimension's comma-separated values as float64, missing values filled by policy."""
    if not text.strip():
        return np.zeros(0, dtype=np.float64)
    parts = text.split(",")
    try:
        x = np.array(parts, dtype=np.float64)  # fast path: numpy parses the strings itself
    except ValueError:
        x = np.empty(len(parts), dtype=np.float64)
        for step, part in enumerate(parts):  # slow path only for lines with '?' or a typo
            part = part.strip()
            if part in _MISSING_TEXT:
                x[step] = np.nan
                continue
            try:
                x[step] = float(part)
            except ValueError:
                raise UserError(f"{where}: dimension {dim} step {step} is {part!r}, not a number") from None
    if np.isinf(x).any():
        step = int(np.argmax(np.isinf(x)))
        raise UserError(f"{where}: dimension {dim} step {step} is {parts[step].strip()!r} (input values must be "
                        "finite)")
    gaps = np.isnan(x)
    if gaps.any():
        if missing == "error":
            step = int(np.argmax(gaps))
            raise UserError(f"{where}: dimension {dim} step {step} is missing ({parts[step].strip()!r}); set "
                            "data.missing=zero or data.missing=ffill to fill missing values")
        if missing == "zero":
            x[gaps] = 0.0
        else:  # ffill: the index of the last observed value at or before each step (-1: none yet)
            last = np.maximum.accumulate(np.where(gaps, -1, np.arange(len(x))))
            x = np.where(last >= 0, x[np.maximum(last, 0)], 0.0)
    return x


def read_ts(path: str, *, task: str, missing: str, labelled: bool = True) -> Parsed:
    """Read a UEA/UCR ``.ts`` file: one sample of ``[length, dimensions]`` float32 steps per case.

    ``missing`` decides what ``?`` (or ``NaN``) becomes: an error, 0, or the dimension's last value
    (0 before the first). classify needs ``@classLabel true``, regress ``@targetLabel true``;
    ``labelled=False`` parses a declared label field but ignores it.
    """
    check_task(path, task, "ts")
    if missing not in MISSING:
        raise UserError(f"{path}: unknown missing-value policy {missing!r} (expected error, zero or ffill)")
    lines = read_lines(path)
    header, data_line = _Header(), 0
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("@"):
            raise UserError(f"{path} line {number}: data before the @data line (header lines start with @)")
        if _header_line(path, number, line, header) == "data":
            data_line = number
            break
    if not data_line:
        raise UserError(f"{path}: no @data line (the header must end with @data, followed by one case per line)")
    has_class = header.classes is not None
    has_target = header.flags.get("targetlabel", False)
    if has_class and has_target:
        raise UserError(f"{path} line {header.class_line}: both @classLabel true and @targetLabel true; a file "
                        "has class labels or regression targets, not both")
    if labelled and task == "classify" and not has_class:
        raise UserError(f"{path}: task classify needs class labels, but the header has no @classLabel true")
    if labelled and task == "regress" and not has_target:
        raise UserError(f"{path}: task regress needs numeric targets, but the header has no @targetLabel true")
    # The number of dimensions: declared, else fixed by the first case.
    dims, dims_from = None, ""
    if "dimensions" in header.numbers:
        dims, dims_line = header.numbers["dimensions"]
        if dims < 1:
            raise UserError(f"{path} line {dims_line}: @dimensions must be at least 1")
        dims_from = f"@dimensions {dims}"
    if header.flags.get("univariate"):
        if dims not in (None, 1):
            raise UserError(f"{path}: @univariate true, but {dims_from}")
        dims, dims_from = 1, "@univariate true"
    length = header.numbers.get("serieslength", (None,))[0] if header.flags.get("equallength") else None
    classes = set(header.classes or ())
    labelled_lines = has_class or has_target
    steps: list[np.ndarray] = []
    lengths: list[int] = []
    labels: list = []
    numbers: list[int] = []
    for number in range(data_line + 1, len(lines) + 1):
        line = lines[number - 1].strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path} line {number}"
        if line.startswith("@"):
            raise UserError(f"{where}: header line after @data (the header must come before @data)")
        fields = line.split(":")
        label = fields.pop().strip() if labelled_lines else None
        if not fields:
            raise UserError(f"{where}: no series before the label (a case is dim1:dim2:...:label, values "
                            "separated by ',')")
        if dims is None:
            dims, dims_from = len(fields), f"line {number} has {len(fields)}"
        if len(fields) != dims:
            what = " and a label" if labelled_lines else ""
            raise UserError(f"{where}: {len(fields)} dimensions{what}, but {dims_from} (fields are separated by "
                            "':')")
        series = [_series(where, d, text, missing) for d, text in enumerate(fields)]
        sizes = [len(s) for s in series]
        if len(set(sizes)) > 1:
            raise UserError(f"{where}: dimensions have different lengths ({', '.join(map(str, sizes))}); every "
                            "dimension of a case needs the same number of values")
        if length is not None and sizes[0] != length:
            raise UserError(f"{where}: the series has {sizes[0]} values, but the header says @equalLength true "
                            f"and @seriesLength {length}")
        with np.errstate(over="ignore"):  # values beyond float32 become inf, reported just below
            rows = np.stack(series, axis=1).astype(np.float32)
        if not np.isfinite(rows).all():  # finite in float64, beyond float32
            dim = int(np.argmax(~np.isfinite(rows).all(axis=0)))
            raise UserError(f"{where}: dimension {dim} has a value beyond float32 range")
        if labelled and task == "classify":
            if label not in classes:
                raise UserError(f"{where}: class label {label!r} is not declared in @classLabel (line "
                                f"{header.class_line})")
            labels.append(label)
        elif labelled and task == "regress":
            try:
                labels.append(finite_target(where, float(label), label))
            except ValueError:
                raise UserError(f"{where}: target {label!r} is not a number (the last field of a case under "
                                "@targetLabel true)") from None
        steps.append(rows)
        lengths.append(sizes[0])
        numbers.append(number)
    offsets = offsets_of(lengths)
    values = np.concatenate(steps) if steps else np.zeros((0, dims or 1), dtype=np.float32)
    targets, label_symbols = targets_of(task, labelled, labels, len(lengths), int(offsets[-1]))
    data = SequenceData(values, offsets, targets, False, lines=np.array(numbers, dtype=np.int64), source=path)
    return Parsed(data, None, label_symbols, labelled)
