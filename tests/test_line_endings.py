"""Line endings: ``\\n``, ``\\r\\n`` and a lone ``\\r`` (old Mac "Text" exports), alone or mixed, in every text format.

Issue 17 (part 3): a CR-only TSV was one line, so a ``regress`` run trained on 1 sequence whose
tokens were the other lines' labels, and ``predict`` wrote 1 row for 3 texts. Each format must read
the same samples, with the same line numbers, whatever the endings, and every error must name the
line an editor shows -- while the other separators ``str.splitlines`` knows (``\\x0b``, ``\\x1c``,
``\\u2028``, ...) stay inside their line.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from test_parsers import BAD, SEPARATORS, decoded, read

from ddp_seq.cli import main
from ddp_seq.config import DataConfig
from ddp_seq.data.readers.encoding import build_encoding
from ddp_seq.data.readers.sources import load_inputs
from ddp_seq.data.readers.text import line_at, read_jsonl, read_tsv, split_lines
from ddp_seq.data.readers.uea import read_ts
from ddp_seq.errors import UserError

ENDINGS = {"lf": "\n", "crlf": "\r\n", "cr": "\r", "mixed": None}
#: The report's training file and predict input, byte for byte (printf's \t and \r).
REPORT_TRAIN = b"1\tgood bad\r0\tbad\r2\tgood good\r1\tgood\r0\tmeh\r3\tgood good good\r"
REPORT_PREDICT = b"good bad\rbad\rgood good\r"


def with_endings(text: str | bytes, ending: str | None) -> str | bytes:
    """``text`` (written with ``\\n``) with every ``\\n`` replaced by ``ending``; ``None``: the three in turn.

    The turn is ``\\r``, ``\\r\\n``, ``\\n``, so a lone ``\\r`` is never followed by ``\\n`` (which would make
    the two one CRLF break across a blank line).
    """
    nl = "\n" if isinstance(text, str) else b"\n"
    cycle = ["\r", "\r\n", "\n"] if isinstance(text, str) else [b"\r", b"\r\n", b"\n"]
    if ending is not None:
        return text.replace(nl, ending if isinstance(text, str) else ending.encode())
    parts = text.split(nl)
    out = parts[0]
    for i, part in enumerate(parts[1:]):
        out += cycle[i % 3] + part
    return out


def put(path: Path, content: str | bytes) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return str(path)


# -- the report ---------------------------------------------------------------------------------

def test_the_reported_cr_only_regress_tsv_has_six_samples(tmp_path):
    parsed = read_tsv(put(tmp_path / "train.tsv", REPORT_TRAIN), task="regress", tokenizer="whitespace")
    assert decoded(parsed, "regress") == [
        (1, 1.0, ["good", "bad"]), (2, 0.0, ["bad"]), (3, 2.0, ["good", "good"]), (4, 1.0, ["good"]),
        (5, 0.0, ["meh"]), (6, 3.0, ["good", "good", "good"])]
    assert parsed.data.targets.tolist() == [1, 0, 2, 1, 0, 3]


def test_the_reported_cr_only_predict_input_has_three_samples(tmp_path):
    path = put(tmp_path / "in.tsv", REPORT_PREDICT)
    parsed = read_tsv(path, task="regress", tokenizer="whitespace", labelled=False)
    assert [s for _, _, s in decoded(parsed, "regress")] == [["good", "bad"], ["bad"], ["good", "good"]]
    assert parsed.data.lines.tolist() == [1, 2, 3]
    # What ``predict`` reads: load_inputs, through the checkpoint's encoding.
    cfg = DataConfig(task="regress", format="tsv", tokenizer="whitespace")
    train = read_tsv(put(tmp_path / "train.tsv", REPORT_TRAIN), task="regress", tokenizer="whitespace")
    encoding = build_encoding(train, np.arange(len(train.data)), "regress")
    data, count, notes = load_inputs(cfg, encoding, path)
    assert count == 3 and len(data) == 3 and data.lengths.tolist() == [2, 1, 2] and notes == []


# -- the same samples under every ending ----------------------------------------------------------

TSV = "\ufeffpos\tgood\x0bbad\u2028day\n\nneg\t\x1c meh \x85x\n\n\nneg\tb\u2029c\x0cd\x1de\x1ef\npos\t\tlast\n"
JSONL = ('{"tokens": ["a\\u000bb", "x\u2028y", "\x85"], "label": "p"}\n\n   \n'
         '{"tokens": ["c"], "label": "q"}\n{"tokens": [], "label": "p"}\n')
JSONL_FEATURES = '{"features": [[1, 2], [3, 4]], "target": 1.5}\n\n{"features": [[5, 6]], "target": -2}\n'
TS = ("# comment\n@problemName p\n\n@dimensions 2\n@classLabel true A B\n@data\n1,2,?:3,4,5:A\n\n"
      "# between cases\n6:7:B\n")
FORMATS = {  # name -> (file name, content, reader arguments, task, expected (line, label, steps))
    "tsv-char": ("d.tsv", TSV, {"tokenizer": "char"}, "classify", [
        (1, "pos", list("good\x0bbad\u2028day")), (3, "neg", list("\x1c meh \x85x")),
        (6, "neg", list("b\u2029c\x0cd\x1de\x1ef")), (7, "pos", list("\tlast"))]),
    "tsv-words": ("d.tsv", TSV, {"tokenizer": "whitespace"}, "classify", [
        (1, "pos", ["good", "bad", "day"]), (3, "neg", ["meh", "x"]), (6, "neg", list("bcdef")),
        (7, "pos", ["last"])]),
    "jsonl-tokens": ("d.jsonl", JSONL, {}, "classify", [
        (1, "p", ["a\x0bb", "x\u2028y", "\x85"]), (4, "q", ["c"]), (5, "p", [])]),
    "jsonl-features": ("d.jsonl", JSONL_FEATURES, {}, "regress", [
        (1, 1.5, [(1.0, 2.0), (3.0, 4.0)]), (3, -2.0, [(5.0, 6.0)])]),
    "ts": ("d.ts", TS, {"missing": "ffill"}, "classify", [
        (7, "A", [(1.0, 3.0), (2.0, 4.0), (2.0, 5.0)]), (10, "B", [(6.0, 7.0)])]),
}


def read_any(path: str, args: dict, task: str, labelled: bool = True):
    if path.endswith(".tsv"):
        return read_tsv(path, task=task, tokenizer=args["tokenizer"], labelled=labelled)
    if path.endswith(".jsonl"):
        return read_jsonl(path, task=task, labelled=labelled)
    return read_ts(path, task=task, missing=args["missing"], labelled=labelled)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("final", [True, False], ids=["ends-with-break", "no-final-break"])
def test_every_format_reads_the_same_samples_under_every_ending(tmp_path, fmt, ending, final):
    name, content, args, task, expected = FORMATS[fmt]
    content = with_endings(content if final else content[:-1], ENDINGS[ending])
    assert ("\r" in content) == (ending != "lf") and ("\n" in content) == (ending != "cr")
    path = put(tmp_path / name, content)
    assert decoded(read_any(path, args, task), task) == expected
    unlabelled = read_any(path, args, task, labelled=False)  # predict input goes through the same lines
    assert unlabelled.data.lines.tolist() == [line for line, _, _ in expected]


# -- errors name the same line under every ending -------------------------------------------------

@pytest.mark.parametrize("ending", ["crlf", "cr", "mixed"])
@pytest.mark.parametrize("name,content,args,line,words", BAD, ids=[f"{b[0]}-{b[4][:30]}" for b in BAD])
def test_errors_name_the_same_line_under_every_ending(tmp_path, ending, name, content, args, line, words):
    path = tmp_path / name
    converted = with_endings(content, ENDINGS[ending])
    assert converted != content
    put(path, converted)
    with pytest.raises(UserError) as info:
        read(path, args)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{path} line {line}: " if line else f"{path}: "), message
    assert words in message, message


def test_errors_after_many_mixed_breaks_count_every_break(tmp_path):
    """Line 8 after 7 breaks of all three kinds, blank lines between them (and a CR right before a CRLF)."""
    head = "1\tb\r\r\n2\td\n\r\n\r3\ty\r\n\n"  # breaks: \r, \r\n, \n, \r\n, \r, \r\n, \n
    assert split_lines(head) == ["1\tb", "", "2\td", "", "", "3\ty", "", ""]
    for body, task, words in [("no tab\n", "classify", "no tab"), ("abc\tz\r", "regress", "not a number")]:
        path = put(tmp_path / "m.tsv", head + body)
        with pytest.raises(UserError, match=re.escape(f"{path} line 8: ") + ".*" + words):
            read_tsv(path, task=task, tokenizer="char")
    raw = b"1\ta\r2\tb\r\n\r3\t\xc3\xa9\xff\n"
    path = put(tmp_path / "u.tsv", raw)
    with pytest.raises(UserError, match=re.escape(f"{path} line 4: not valid UTF-8 (byte 0xff at column 5)")):
        read_tsv(path, task="classify", tokenizer="char")


# -- the splitting itself -----------------------------------------------------------------------

def test_split_lines_breaks_at_the_three_endings_only():
    assert split_lines("a\rb\r\nc\nd") == ["a", "b", "c", "d"]
    assert split_lines("a\r\r\nb\n\rc\r") == ["a", "", "b", "", "c", ""]
    assert split_lines("") == [""] and split_lines("\r\n") == ["", ""]
    for sep in SEPARATORS:
        assert split_lines(f"x{sep}y\rz") == [f"x{sep}y", "z"]
    rng = random.Random(17)
    pool = ["a", "\r", "\n", "\r\n", "\n\r", *SEPARATORS, "日"]
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(0, 30)))
        assert split_lines(text) == re.split("\r\n|\r|\n", text), repr(text)


def test_line_at_counts_like_split_lines():
    rng = random.Random(3)
    pool = [b"a", b"\r", b"\n", b"\r\n", b"\xc3\xa9", b"\x0b", b"\xe2\x80\xa8"]
    for _ in range(300):
        raw = b"".join(rng.choice(pool) for _ in range(rng.randrange(0, 20)))
        pos = rng.randrange(len(raw) + 1)
        before = raw[:pos].decode("utf-8", errors="replace")
        lines = re.split("\r\n|\r|\n", before)
        assert line_at(raw, pos) == (len(lines), len(raw[:pos]) - max(raw[:pos].rfind(b"\n"),
                                                                        raw[:pos].rfind(b"\r"))), repr((raw, pos))


# -- end to end ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_and_predict_on_cr_only_files(tmp_path, capsys):
    """The report's commands: train on the CR-only file (6 sequences; val from a second CR-only file),
    then predict on a CR-only input. Through the CLI's entry point in this process: the files are read
    by the same code in a launched process (launches of both commands: tests/test_end_to_end.py,
    tests/test_inference.py)."""
    train = put(tmp_path / "train.tsv", REPORT_TRAIN)
    val = put(tmp_path / "val.tsv", b"2\tgood good\r0\tbad\r\n1\tgood\n")
    capsys.readouterr()
    assert main(["train", "data.format=tsv", f"data.train_path={train}", f"data.val_path={val}",
                 "data.task=regress", "training.monitor=val_mse", "data.tokenizer=whitespace",
                 "model.hidden=8", "model.embedding_dim=8", "model.layers=1", "training.epochs=1",
                 "training.warmup_steps=0", "logging.progress=none", f"logging.root={tmp_path / 'runs'}",
                 "logging.name=cr"]) == 0
    trained = capsys.readouterr()
    log = trained.out + trained.err
    # 6 samples of 2 + 1 + 2 + 1 + 1 + 3 words; the 3 validation samples are the val file's 3 lines.
    assert "training regress on 6 sequences (10 steps)" in log, log
    assert "data: 6 training samples (10 steps)" in log and "3 validation samples" in log, log
    inputs = put(tmp_path / "in.tsv", REPORT_PREDICT)
    output = tmp_path / "out.jsonl"
    assert main(["predict", "--checkpoint", str(tmp_path / "runs" / "cr" / "checkpoints" / "last.pt"),
                 "--input", inputs, "--output", str(output)]) == 0
    predicted = capsys.readouterr()
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").split("\n") if line]
    assert len(rows) == 3 and all(isinstance(r["prediction"], float) for r in rows), predicted
    assert "predicted 3 of 3 samples" in predicted.out + predicted.err, predicted
