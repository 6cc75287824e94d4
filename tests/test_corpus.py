"""make-data: the sample files of every format and the stdlib line-classification corpus (pure Python, fast)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ddp_seq.data.readers import corpus
from ddp_seq.data.readers.corpus import main, write_samples, write_stdlib_corpus
from ddp_seq.data.readers.files import load_npz

# -- samples -------------------------------------------------------------------------------------------

SAMPLE_FILES = {f"{stem}{split}.{ext}" for stem, ext in (("reviews", "tsv"), ("events", "jsonl"), ("tags", "jsonl"),
                                                         ("sensors", "npz"), ("motions", "ts"))
                for split in ("", "-val")}


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_samples(tmp_path_factory.mktemp("samples"))


def test_samples_every_file_small_and_deterministic(samples, tmp_path):
    assert set(samples) == SAMPLE_FILES
    for name, path in samples.items():
        assert path.name == name and 1000 < path.stat().st_size < 320_000, name
    again = write_samples(tmp_path / "again")
    other = write_samples(tmp_path / "other", seed=1)
    for name in SAMPLE_FILES:
        assert again[name].read_bytes() == samples[name].read_bytes(), name
        assert other[name].read_bytes() != samples[name].read_bytes(), name
    assert not [p for p in samples["reviews.tsv"].parent.iterdir() if p.name.startswith(".")]  # no temp files


def test_samples_reviews_tsv(samples):
    for name, n in (("reviews.tsv", 600), ("reviews-val.tsv", 150)):
        lines = samples[name].read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and len(lines) - 1 == n
        for line in lines[:-1]:
            label, text = line.split("\t")  # exactly one tab
            assert label in ("pos", "neg") and text.strip() == text and text
            words = text.lower().replace(",", " ").replace(";", " ").replace(".", " ").split()
            pos, neg = sum(w in corpus.POSITIVE for w in words), sum(w in corpus.NEGATIVE for w in words)
            assert (pos > neg) == (label == "pos")  # the label follows from the words
    text = samples["reviews.tsv"].read_text(encoding="utf-8")
    assert "café" in text and "très" in text and "naïve" in text
    assert len({len(line) for line in text.splitlines()}) > 20


def test_samples_jsonl(samples):
    records = [json.loads(line) for line in samples["events.jsonl"].read_text(encoding="utf-8").splitlines()]
    assert len(records) == 600 and len({len(r["tokens"]) for r in records}) > 20
    for r in records:
        (top, n), *rest = Counter(r["tokens"]).most_common()
        assert r["label"] == top and (not rest or rest[0][1] < n)
    assert len({r["label"] for r in records}) == len(corpus.EVENTS)
    tags = [json.loads(line) for line in samples["tags-val.jsonl"].read_text(encoding="utf-8").splitlines()]
    assert len(tags) == 100 and len({len(r["tags"]) for r in tags}) > 20
    for r in tags:
        assert len(r["tags"]) == len(r["features"]) >= corpus.MIN_LEN and all(len(f) == 2 for f in r["features"])
        running = np.cumsum([f[0] for f in r["features"]])
        assert r["tags"] == ["on" if s > 0 else "off" for s in running]


def test_samples_npz_layout(samples):
    for name, n in (("sensors.npz", 600), ("sensors-val.npz", 150)):
        with np.load(samples[name], allow_pickle=False) as npz:
            assert sorted(npz.files) == ["data", "labels", "lengths"]
            data, lengths, labels = npz["data"], npz["lengths"], npz["labels"]
        assert data.dtype == np.float32 and lengths.dtype == np.int64 and labels.dtype == np.int64
        assert data.ndim == 2 and lengths.shape == labels.shape == (n,) and lengths.sum() == len(data)
        assert lengths.min() >= corpus.MIN_LEN and len(set(lengths.tolist())) > 20 and set(labels.tolist()) == {0, 1, 2}
        loaded = load_npz(samples[name], "classify")  # the project's own reader accepts it
        assert len(loaded) == n


def test_samples_ts(samples):
    lines = samples["motions.ts"].read_text(encoding="utf-8").splitlines()
    assert lines[:8] == ["@problemName Motions", "@timeStamps false", "@missing false", "@univariate false",
                         "@dimensions 3", "@equalLength false", "@classLabel true walk run sit", "@data"]
    lengths, labels = set(), Counter()
    for line in lines[8:]:
        *dims, label = line.split(":")
        assert len(dims) == 3 and label in ("walk", "run", "sit")
        values = [[float(v) for v in d.split(",")] for d in dims]
        assert len({len(v) for v in values}) == 1  # every dimension has the series' length
        lengths.add(len(values[0]))
        labels[label] += 1
    assert len(lines) - 8 == 400 and len(lengths) > 20 and len(labels) == 3


# -- stdlib corpus -------------------------------------------------------------------------------------

SHARED = "shared_helper = configure(everything=True)"  # in two packages: ambiguous
REPEATED = "repeated_in_asyncio = call_soon(callback)"  # in two asyncio files: kept once


def fake_stdlib(root: Path) -> Path:
    """Three of the packages (asyncio, email, http) with a few files each, and things to be ignored."""
    files = {}
    for package, n_files in (("asyncio", 6), ("email", 4), ("http", 3)):
        for f in range(n_files):
            body = [f"value_{package}_{f}_{i} = compute_{package}({i}, {f})" for i in range(10 + 5 * f)]
            files[f"{package}/mod{f}.py"] = body
    files["asyncio/mod0.py"] += [SHARED, REPEATED, "", "   ", "x = 1", "})]);", "# --------------------------",
                                 "if\tthe_tab_line_here:  ", "long_line = '" + "x" * 300 + "'"]
    files["asyncio/mod1.py"] += [REPEATED]
    files["email/mod2.py"] += [SHARED]
    files["asyncio/tests/test_mod.py"] = ["excluded_tests_line = 12345678"]
    files["email/test/helper.py"] = ["excluded_test_line = 12345678"]
    files["email/sub/deep.py"] = [f"deep_email_line_{i} = parse_header({i})" for i in range(8)]
    files["os.py"] = ["not_a_package_line = 12345678"]
    files["notlisted/mod.py"] = ["not_listed_line = 12345678"]
    for rel, body in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(body) + "\n", encoding="utf-8")
    return root


def read_tsv(path: Path) -> list[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n") and "\r" not in text
    rows = [tuple(line.split("\t")) for line in text[:-1].split("\n")]
    assert all(len(row) == 2 for row in rows)  # exactly label<TAB>line
    return rows


def test_stdlib_corpus_on_a_fake_tree(tmp_path):
    root = fake_stdlib(tmp_path / "lib")
    stats = write_stdlib_corpus(tmp_path / "out", stdlib=root)
    train, val = read_tsv(tmp_path / "out" / "stdlib-train.tsv"), read_tsv(tmp_path / "out" / "stdlib-val.tsv")
    rows = train + val
    lines = [line for _, line in rows]
    assert {label for label, _ in rows} == {"asyncio", "email", "http"} == set(stats["packages"])
    assert len(lines) == len(set(lines))  # no line twice, in or across splits
    assert SHARED not in lines and lines.count(REPEATED) == 1
    assert "if the_tab_line_here:" in lines and all("\t" not in line and line == line.strip() for line in lines)
    assert all(corpus.MIN_CHARS <= len(line) <= corpus.MAX_CHARS for line in lines)
    assert not any("excluded" in line or "not_a" in line or "not_listed" in line for line in lines)
    assert "})]);" not in lines and not any(line.startswith("# ---") for line in lines)
    assert sum("deep_email_line" in line for line in lines) == 8  # subfolders other than test(s) count
    assert stats["dropped"]["ambiguous"] == 1 and stats["dropped"]["duplicate"] == 1
    # Split by file: each source file's lines all lie on one side; every package has both sides.
    source = {}
    for path in root.rglob("*.py"):
        for raw in path.read_text(encoding="utf-8").splitlines():
            source.setdefault(raw.replace("\t", " ").strip(), set()).add(path)
    sides: dict[Path, set[str]] = {}
    for side, split in (("train", train), ("val", val)):
        for _, line in split:
            if len(source[line]) == 1:  # REPEATED is in two files
                (path,) = source[line]
                sides.setdefault(path, set()).add(side)
    assert len(sides) == 14 and all(len(s) == 1 for s in sides.values()), sides
    for package, c in stats["classes"].items():
        assert c["train"] > 0 and c["val"] > 0 and c["val_files"] >= 1, package
        assert c["train"] == sum(label == package for label, _ in train)
        assert c["val"] == sum(label == package for label, _ in val)
    assert stats["train_lines"] == len(train) and stats["val_lines"] == len(val)
    assert stats["missing_packages"] == [p for p in corpus.STDLIB_PACKAGES if p not in ("asyncio", "email", "http")]
    # The baseline: the most frequent training class, scored on val.
    top = Counter(label for label, _ in train).most_common(1)[0][0]
    assert stats["majority_class"] == top
    assert stats["majority_baseline"] == round(sum(label == top for label, _ in val) / len(val), 4)
    assert json.loads((tmp_path / "out" / "stdlib-stats.json").read_text(encoding="utf-8")) == stats
    # Deterministic: the same tree gives the same bytes.
    write_stdlib_corpus(tmp_path / "again", stdlib=root)
    for name in corpus.STDLIB_FILES.values():
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


def test_stdlib_corpus_needs_a_stdlib(tmp_path):
    with pytest.raises(corpus.UserError, match="no such directory"):
        write_stdlib_corpus(tmp_path / "out", stdlib=tmp_path / "missing")
    (tmp_path / "lib" / "asyncio").mkdir(parents=True)
    with pytest.raises(corpus.UserError, match="holds 1 of the packages"):
        write_stdlib_corpus(tmp_path / "out", stdlib=tmp_path / "lib")


def test_stdlib_corpus_on_the_real_stdlib(tmp_path):
    stats = write_stdlib_corpus(tmp_path)
    assert len(stats["packages"]) >= 5 and stats["majority_baseline"] < 0.5
    assert 10_000 < stats["train_lines"] < 100_000 and stats["val_lines"] > 1000
    assert all(c["train"] > 0 and c["val"] > 0 for c in stats["classes"].values())


# -- command line ----------------------------------------------------------------------------------------

def test_main_bad_stdlib_is_one_error_line(tmp_path, capsys):
    assert main(["stdlib", "--out", str(tmp_path / "out"), "--stdlib", str(tmp_path / "nope")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("ddp-seq: error: ") and err.count("\n") == 1 and "nope" in err and out == ""


def test_main_unwritable_out_is_one_error_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["samples", "--out", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ddp-seq: error: ") and err.count("\n") == 1


def test_main_writes_and_reports(tmp_path, capsys):
    assert main(["samples", "--out", str(tmp_path / "s"), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == len(SAMPLE_FILES) and set(p.name for p in (tmp_path / "s").iterdir()) == SAMPLE_FILES
    assert main(["stdlib", "--out", str(tmp_path / "c"), "--stdlib", str(fake_stdlib(tmp_path / "lib"))]) == 0
    out = capsys.readouterr().out
    assert "stdlib-train.tsv" in out and "majority baseline" in out and "asyncio" in out
