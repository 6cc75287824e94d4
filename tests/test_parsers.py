"""TSV, JSONL and UEA .ts parsers: random files against slow reference readers, one-line errors, predict input.

The references below are deliberately naive (character loops, per-sample lists) so that they are
obviously right; the parsers are compared with them through decoded content (ids mapped back
through the symbol lists), never through ids, whose order is the parser's own business.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from ddp_seq.data.readers.encoding import Parsed
from ddp_seq.data.readers.text import read_jsonl, read_tsv
from ddp_seq.data.readers.uea import read_ts
from ddp_seq.errors import UserError

# Every separator str.splitlines knows besides \r and \n: inside a line they are text, never a line break.
SEPARATORS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
ALPHABET = ["a", "b", "z", " ", " ", "\t", "é", "ü", "日", "本", "ß", *SEPARATORS, "😀"]
WORDS = ["é", "über", "日本", "cat", "dog", "ß", "x\x0by", "\u2028", "a\x85b", "\x1dc\u2029"]
#: The line endings files are written with: each alone, and a mix of the three within one file.
ENDINGS = ["\n", "\r\n", "\r", "mixed"]


# -- references ---------------------------------------------------------------------------------

def ref_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line, text) of the non-empty lines: decode, drop BOM, split by hand at '\\r\\n', '\\r' and '\\n'."""
    text = path.read_bytes().decode("utf-8")
    if text and text[0] == "\ufeff":
        text = text[1:]
    lines, current, i = [], "", 0
    while i < len(text):
        ch = text[i]
        if ch in "\r\n":
            lines.append(current)
            current = ""
            if text[i:i + 2] == "\r\n":
                i += 1  # one break, not two
        else:
            current += ch
        i += 1
    lines.append(current)
    return [(i + 1, line) for i, line in enumerate(lines) if line != ""]


def ref_tsv(path: Path, task: str, tokenizer: str, labelled: bool) -> list[tuple[int, object, list]]:
    out = []
    for number, line in ref_lines(path):
        if "\t" in line:
            cut = line.index("\t")
            label, text = line[:cut].strip(), line[cut + 1:]
        else:
            label, text = None, line
        tokens = [ch for ch in text] if tokenizer == "char" else text.split()
        if not labelled:
            label = None
        elif task == "regress":
            label = float(np.float32(float(label)))
        out.append((number, label, tokens))
    return out


def ref_jsonl(path: Path, task: str, labelled: bool) -> list[tuple[int, object, list]]:
    out = []
    for number, line in ref_lines(path):
        if line.strip() == "":
            continue
        obj = json.loads(line)
        if "tokens" in obj:
            steps = list(obj["tokens"])
        else:
            steps = []
            for step in obj["features"]:
                row = step if isinstance(step, list) else [step]
                steps.append(tuple(float(np.float32(v)) for v in row))
        label = None
        if labelled:
            label = {"classify": lambda o: o["label"], "tag": lambda o: list(o["tags"]),
                     "regress": lambda o: float(np.float32(o["target"]))}[task](obj)
        out.append((number, label, steps))
    return out


def ref_ts(path: Path, missing: str, labelled: bool) -> list[tuple[int, object, list]]:
    out, in_data, has_label = [], False, False
    for number, line in ref_lines(path):
        line = line.strip()
        if line == "" or line.startswith("#"):
            continue
        if not in_data:
            words = line.split()
            if words[0].lower() in ("@classlabel", "@targetlabel") and words[1] == "true":
                has_label = True
            in_data = words[0].lower() == "@data"
            continue
        fields = line.split(":")
        label = fields.pop().strip() if has_label else None
        dims = []
        for field in fields:
            series, last = [], 0.0
            for part in field.split(","):
                if part.strip() in ("?", "NaN", "nan"):
                    series.append(0.0 if missing == "zero" else last)
                else:
                    last = float(part)
                    series.append(last)
            dims.append(series)
        steps = [tuple(float(np.float32(dims[d][t])) for d in range(len(dims))) for t in range(len(dims[0]))]
        out.append((number, label if labelled else None, steps))
    return out


def decoded(parsed: Parsed, task: str) -> list[tuple[int, object, list]]:
    """The parser's samples in the references' shape: (line, label, steps) with symbols, not ids."""
    data, out = parsed.data, []
    assert data.offsets[0] == 0 and len(data.offsets) == len(data) + 1
    assert np.all(np.diff(data.offsets) >= 0) and data.offsets[-1] == len(data.values)
    assert data.offsets.dtype == np.int64 and data.lines.dtype == np.int64 and data.per_step == (task == "tag")
    for i in range(len(data)):
        lo, hi = int(data.offsets[i]), int(data.offsets[i + 1])
        if parsed.token_symbols is not None:
            assert data.values.dtype == np.int64 and data.values.ndim == 1
            steps = [parsed.token_symbols[v] for v in data.values[lo:hi]]
        else:
            assert data.values.dtype == np.float32 and data.values.ndim == 2 and data.values.shape[1] >= 1
            steps = [tuple(float(v) for v in row) for row in data.values[lo:hi]]
        label = None
        if parsed.labelled:
            if task == "tag":
                label = [parsed.label_symbols[t] for t in data.targets[lo:hi]]
            elif task == "classify":
                label = parsed.label_symbols[data.targets[i]]
            else:
                assert data.targets.dtype == np.float32
                label = float(data.targets[i])
        out.append((int(data.lines[i]), label, steps))
    return out


def write(path: Path, lines: list[str], rng: random.Random, ending: str, bom: bool) -> Path:
    """Each of ``lines`` ended by ``ending`` (one of ENDINGS), blank lines sprinkled in, a BOM on request.

    ``mixed`` picks each line's ending at random, but never puts a lone '\\r' right before a '\\n'
    (across a blank line, they would be one CRLF); the file may or may not end with a line break.
    """
    out, previous = [], ""
    for line in lines:
        for part in (["", line] if rng.random() < 0.1 else [line]):
            end = ending if ending != "mixed" else rng.choice(["\n", "\r\n", "\r"])
            if previous == "\r" and end == "\n":
                end = "\r\n"
            out.append(part + end)
            previous = end
    text = "".join(out)
    if rng.random() < 0.5:
        text = text[:-len(previous)]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


# -- TSV ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["classify", "regress"])
@pytest.mark.parametrize("tokenizer", ["char", "whitespace"])
@pytest.mark.parametrize("ending,bom", [("\n", False), ("\r\n", True), ("\r", False), ("mixed", True)])
def test_tsv_matches_reference(tmp_path, task, tokenizer, ending, bom):
    rng = random.Random(f"{task}{tokenizer}{ending}")
    lines = []
    for _ in range(200):
        label = rng.choice(["pos", "nég", "3", " 日本 "]) if task == "classify" else f"{rng.uniform(-5, 5):.4f}"
        pool = ALPHABET if tokenizer == "char" else [*WORDS, " ", "\t", "  "]
        text = "".join(rng.choice(pool) for _ in range(rng.choice([0, 1, 5, 30])))
        lines.append(f"{label}\t{text}")
    path = write(tmp_path / "d.tsv", lines, rng, ending, bom)
    expected = ref_tsv(path, task, tokenizer, True)
    assert len(expected) == 200 and any(not tokens for _, _, tokens in expected)
    parsed = read_tsv(str(path), task=task, tokenizer=tokenizer)
    assert parsed.labelled and parsed.data.source == str(path)
    assert decoded(parsed, task) == expected
    if task == "classify":
        assert all(isinstance(s, str) for s in parsed.label_symbols) and "3" in parsed.label_symbols
    assert read_tsv(str(path), task=task, tokenizer=tokenizer, labelled=False).data.lines.tolist() == \
        [n for n, _, _ in expected]


def test_tsv_unlabelled(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("1\thé llo\n\nno label here\n\t\n2\ty\tz\n", encoding="utf-8")  # labels: regress needs numbers
    for task in ("classify", "regress"):
        parsed = read_tsv(str(path), task=task, tokenizer="whitespace", labelled=False)
        assert not parsed.labelled and parsed.label_symbols is None
        assert decoded(parsed, task) == ref_tsv(path, task, "whitespace", False)
        assert [s for _, _, s in decoded(parsed, task)] == [["hé", "llo"], ["no", "label", "here"], [], ["y", "z"]]
        assert parsed.data.targets.tolist() == [0, 0, 0, 0]
        assert parsed.data.targets.dtype == (np.float32 if task == "regress" else np.int64)


# -- JSONL --------------------------------------------------------------------------------------

def jsonl_line(rng: random.Random, inputs: str, task: str, width: int) -> str:
    length = rng.choice([0, 1, 3, 12])
    obj: dict = {"id": rng.randrange(10**6)}
    if inputs == "str":
        obj["tokens"] = [rng.choice(WORDS) for _ in range(length)]
    elif inputs == "int":
        obj["tokens"] = [rng.randrange(-3, 50) for _ in range(length)]
    elif width == 0:  # scalars: one feature per step
        obj["features"] = [rng.choice([rng.randrange(-9, 9), rng.uniform(-1e3, 1e3)]) for _ in range(length)]
    else:
        obj["features"] = [[rng.uniform(-2, 2) for _ in range(width)] for _ in range(length)]
    if task == "classify":
        obj["label"] = rng.choice(["spam", "ham", "日本"])
    elif task == "regress":
        obj["target"] = rng.choice([rng.uniform(-1e3, 1e3), rng.randrange(100)])
    else:
        obj["tags"] = [rng.choice([0, 1, 2]) for _ in range(length)]
    return json.dumps(obj, ensure_ascii=rng.random() < 0.5)


@pytest.mark.parametrize("inputs,task,width,ending", [
    ("str", "classify", 0, "\n"), ("int", "classify", 0, "\r\n"), ("str", "tag", 0, "\r"),
    ("int", "regress", 0, "mixed"), ("vec", "classify", 3, "\r"), ("vec", "tag", 1, "\r\n"),
    ("scalar", "regress", 0, "mixed"), ("vec", "regress", 5, "\n")])
def test_jsonl_matches_reference(tmp_path, inputs, task, width, ending):
    rng = random.Random(f"{inputs}{task}{width}")
    lines = [jsonl_line(rng, inputs, task, width) for _ in range(200)]
    lines.insert(5, "   ")  # whitespace-only lines are blank in JSONL
    path = write(tmp_path / "d.jsonl", lines, rng, ending, bom=inputs == "int")
    parsed = read_jsonl(str(path), task=task)
    expected = ref_jsonl(path, task, True)
    assert len(expected) == 200 and decoded(parsed, task) == expected
    assert (parsed.token_symbols is None) == (inputs in ("vec", "scalar"))
    if inputs == "int":
        assert all(type(t) is int for t in parsed.token_symbols)
    if parsed.label_symbols is not None:
        assert len(set(parsed.label_symbols)) == len(parsed.label_symbols)
    unlabelled = read_jsonl(str(path), task=task, labelled=False)
    assert decoded(unlabelled, task) == ref_jsonl(path, task, False)
    total = len(unlabelled.data.values)
    assert len(unlabelled.data.targets) == (total if task == "tag" else 200)


def test_jsonl_unlabelled_ignores_label_keys(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"tokens": ["a"]}\n{"tokens": ["b"], "label": 1.5}\n{"tokens": [], "tags": "x"}\n')
    parsed = read_jsonl(str(path), task="tag", labelled=False)
    assert not parsed.labelled and parsed.label_symbols is None
    assert parsed.data.targets.tolist() == [0, 0] and parsed.data.lengths.tolist() == [1, 1, 0]


def test_jsonl_sparse_integer_tokens(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"tokens": [4611686018427387904, -5, 4611686018427387904], "label": 0}\n'
                    '{"tokens": [-9223372036854775808], "label": 0}\n')
    parsed = read_jsonl(str(path), task="classify")
    assert decoded(parsed, "classify") == ref_jsonl(path, "classify", True)
    assert all(type(t) is int for t in parsed.token_symbols)


# -- UEA .ts ------------------------------------------------------------------------------------

def ts_file(path: Path, rng: random.Random, dims: int, task: str, holes: bool, ending: str) -> Path:
    classes = ["Standing", "Running", "Wälking", "1"]
    header = ["# a comment", "@problemName Test", "@timeStamps false", f"@missing {str(holes).lower()}",
              f"@univariate {'true' if dims == 1 else 'false'}", f"@DIMENSIONS {dims}", "@equalLength false"]
    header.append("@classLabel true " + " ".join(classes) if task == "classify" else "@targetLabel true")
    lines = [*header, "@data"]
    for _ in range(200):
        length = rng.choice([1, 2, 7, 20])
        fields = []
        for _ in range(dims):
            values = [rng.choice(["?", "NaN"]) if holes and rng.random() < 0.2 else repr(rng.uniform(-3, 3))
                      for _ in range(length)]
            fields.append(",".join(values))
        label = rng.choice(classes) if task == "classify" else f"{rng.uniform(0, 100):.3f}"
        lines.append(":".join([*fields, label]))
    return write(path, lines, rng, ending, bom=ending == "\r\n")


@pytest.mark.parametrize("dims,task", [(1, "classify"), (3, "classify"), (2, "regress")])
@pytest.mark.parametrize("missing", ["zero", "ffill", "error"])
def test_ts_matches_reference(tmp_path, dims, task, missing):
    rng = random.Random(f"{dims}{task}{missing}")
    ending = ENDINGS[(dims + ["zero", "ffill", "error"].index(missing)) % len(ENDINGS)]  # each ending, some dims
    path = ts_file(tmp_path / "d.ts", rng, dims, task, holes=missing != "error", ending=ending)
    expected = ref_ts(path, missing, True)
    if task == "regress":
        expected = [(n, float(np.float32(float(label))), steps) for n, label, steps in expected]
    parsed = read_ts(str(path), task=task, missing=missing)
    assert parsed.token_symbols is None and parsed.data.values.shape[1] == dims
    assert len(expected) == 200 and decoded(parsed, task) == expected
    unlabelled = read_ts(str(path), task=task, missing=missing, labelled=False)
    assert decoded(unlabelled, task) == ref_ts(path, missing, False)


def test_ts_unlabelled_without_label_field(tmp_path):
    path = tmp_path / "p.ts"
    path.write_text("@problemName p\n@classLabel false\n@data\n1,2,3\n4\n", encoding="utf-8")
    parsed = read_ts(str(path), task="classify", missing="error", labelled=False)
    assert parsed.data.lengths.tolist() == [3, 1] and parsed.data.lines.tolist() == [4, 5]
    assert parsed.data.targets.tolist() == [0, 0] and parsed.label_symbols is None
    with pytest.raises(UserError, match="@classLabel true"):
        read_ts(str(path), task="classify", missing="error")


# -- errors -------------------------------------------------------------------------------------

TS_HEAD = "@problemName p\n@univariate false\n@dimensions 2\n@classLabel true A B\n@data\n"
BAD = [  # (file name, content, reader arguments, line at fault or None, words in the message)
    ("a.tsv", "x\ty\nno tab\n", {}, 2, "no tab"),
    ("a.tsv", "x\ty\n\n  \ty\n", {}, 3, "empty label"),
    ("a.tsv", b"x\ty\nx\t\xc3\xa9\xff\n", {}, 2, "not valid UTF-8 (byte 0xff at column 5)"),
    ("a.tsv", "1\ty\nabc\ty\n", {"task": "regress"}, 2, "not a number"),
    ("a.tsv", "inf\ty\n", {"task": "regress"}, 1, "finite"),
    ("a.tsv", "x\ty\n", {"task": "tag"}, None, "jsonl"),
    ("a.jsonl", '{"tokens": ["a"], "label": 1}\n{"tokens": ["a"], "label": 1,}\n', {}, 2, "invalid JSON"),
    ("a.jsonl", '\n["a"]\n', {}, 2, "JSON object"),
    ("a.jsonl", '{"tokens": ["a", 1], "label": 1}\n', {}, 1, "all strings or all integers"),
    ("a.jsonl", '{"tokens": [], "label": 1}\n{"tokens": [1], "label": 1}\n{"tokens": ["a"], "label": 2}\n', {},
     3, "line 2 has integers"),
    ("a.jsonl", '{"tokens": [true], "label": 1}\n', {}, 1, "all strings or all integers"),
    ("a.jsonl", '{"tokens": [1.5], "label": 1}\n', {}, 1, "all strings or all integers"),
    ("a.jsonl", '{"tokens": [1, 18446744073709551616], "label": 1}\n', {}, 1, "64-bit"),
    ("a.jsonl", '{"features": [[1, 2]], "label": 1}\n{"features": [[1, 2], [3]], "label": 1}\n', {}, 2,
     "step 1 has 1 features, but the first step (line 1) has 2"),
    ("a.jsonl", '{"features": [[1, NaN]], "label": 1}\n', {}, 1, "step 0 feature 1 is NaN"),
    ("a.jsonl", '{"features": [1, 2, Infinity], "label": 1}\n', {}, 1, "step 2 feature 0 is Infinity"),
    ("a.jsonl", '{"features": [[1, true]], "label": 1}\n', {}, 1, "must be numbers"),
    ("a.jsonl", '{"features": [1], "label": 1}\n{"tokens": [1], "label": 1}\n', {}, 2, "'features'"),
    ("a.jsonl", '{"features": [1], "tokens": [1], "label": 1}\n', {}, 1, "both"),
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": ["x"]}\n', {"task": "tag"}, 1, "1 entries, but the input has 2"),
    ("a.jsonl", '{"tokens": ["a"], "label": "x"}\n{"tokens": ["a"]}\n', {}, 2, "no 'label' key"),
    ("a.jsonl", '{"tokens": ["a"], "label": "x"}\n{"tokens": ["a"], "label": 2}\n', {}, 2, "line 1 has strings"),
    ("a.jsonl", '{"tokens": ["a"], "label": true}\n', {}, 1, "string or an integer"),
    ("a.jsonl", '{"tokens": ["a"], "label": 1}\n{"tokens": ["a"], "label": -2}\n', {}, 2, "class indices (>= 0)"),
    ("a.jsonl", '{"tokens": ["a", "b"], "tags": [0, -1]}\n', {"task": "tag"}, 1, "class indices (>= 0)"),
    ("a.jsonl", '{"tokens": ["a"], "target": NaN}\n', {"task": "regress"}, 1, "finite"),
    ("a.jsonl", '{"tokens": ["a"], "target": 1%s}\n' % ("0" * 400), {"task": "regress"}, 1, "finite"),
    ("a.jsonl", '{"features": [[1%s]], "label": 1}\n' % ("0" * 400), {}, 1, "too large"),
    ("a.jsonl", '{"features": [1e39], "label": 1}\n', {}, 1, "beyond float32 range"),
    ("a.ts", "@problemName p\n@colour blue\n@data\n", {}, 2, "unknown header keyword @colour"),
    ("a.ts", "@problemName p\n@classLabel true A\n1,2:A\n", {}, 3, "before the @data"),
    ("a.ts", "@problemName p\n@classLabel true A\n", {}, None, "no @data line"),
    ("a.ts", "@problemName p\n@classLabel true\n@data\n", {}, 2, "class names"),
    ("a.ts", "@problemName p\n@timeStamps true\n@data\n", {}, 2, "not supported"),
    ("a.ts", "@univariate maybe\n@data\n", {}, 1, "true or false"),
    ("a.ts", "@dimensions two\n@data\n", {}, 1, "whole number"),
    ("a.ts", "@classLabel true A\n@data\n1:A\n@dimensions 2\n", {}, 4, "after @data"),
    ("a.ts", TS_HEAD + "1,2,3:4,5:A\n", {}, 6, "different lengths (3, 2)"),
    ("a.ts", TS_HEAD + "1,2:4,5:A\n1,2:B\n", {}, 7, "1 dimensions and a label, but @dimensions 2"),
    ("a.ts", TS_HEAD + "1,2:4,5:A\n1,2:3,4:C\n", {}, 7, "'C' is not declared"),
    ("a.ts", TS_HEAD + "1,?:4,5:A\n", {}, 6, "dimension 0 step 1 is missing"),
    ("a.ts", TS_HEAD + "1,2:4,inf:A\n", {"missing": "zero"}, 6, "dimension 1 step 1 is 'inf'"),
    ("a.ts", TS_HEAD + "1,2:4,x:A\n", {"missing": "zero"}, 6, "'x', not a number"),
    ("a.ts", TS_HEAD + "1,2:4,1e39:A\n", {}, 6, "dimension 1 has a value beyond float32 range"),
    ("a.ts", "@equalLength true\n@seriesLength 3\n@classLabel true A\n@data\n1,2:A\n", {}, 5, "@seriesLength 3"),
    ("a.ts", "@classLabel true A\n@data\n1,2:A\n", {"task": "regress"}, None, "@targetLabel true"),
    ("a.ts", "@targetLabel true\n@data\n1,2:abc\n", {"task": "regress"}, 3, "not a number"),
]


def read(path: Path, args: dict) -> Parsed:
    task = args.get("task", "classify")
    if path.suffix == ".tsv":
        return read_tsv(str(path), task=task, tokenizer="char")
    if path.suffix == ".jsonl":
        return read_jsonl(str(path), task=task)
    return read_ts(str(path), task=task, missing=args.get("missing", "error"))


@pytest.mark.parametrize("name,content,args,line,words", BAD, ids=[f"{b[0]}-{b[4][:30]}" for b in BAD])
def test_errors_are_one_line_naming_path_and_line(tmp_path, name, content, args, line, words):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        read(path, args)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path))
    assert message.startswith(f"{path} line {line}: " if line else f"{path}: "), message
    assert words in message, message


@pytest.mark.parametrize("name", ["a.tsv", "a.jsonl", "a.ts"])
def test_missing_file_and_directory(tmp_path, name):
    with pytest.raises(UserError, match=r"no such file$") as info:
        read(tmp_path / name, {})
    assert str(info.value).startswith(str(tmp_path / name))
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="not a regular file"):
        read_tsv(str(tmp_path / "dir"), task="classify", tokenizer="char")


def test_empty_samples_and_blank_file(tmp_path):
    path = tmp_path / "e.tsv"
    path.write_bytes(b"\xef\xbb\xbf\r\n\r\n")
    parsed = read_tsv(str(path), task="classify", tokenizer="char")
    assert len(parsed.data) == 0 and parsed.token_symbols == []
    path.write_text("a\t\nb\t\n")
    parsed = read_tsv(str(path), task="classify", tokenizer="char")
    assert parsed.data.lengths.tolist() == [0, 0] and parsed.data.values.dtype == np.int64
    regress = tmp_path / "r.tsv"
    regress.write_text(" 1e3 \tx\n")
    assert math.isclose(float(read_tsv(str(regress), task="regress", tokenizer="char").data.targets[0]), 1000.0)
