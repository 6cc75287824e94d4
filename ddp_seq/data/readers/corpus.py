"""Data to train on without a download: ``ddp-seq make-data samples|stdlib --out DIR``.

``samples``: tiny files, one task per data format (tsv, jsonl, npz, ts), each learnable in a short run,
for the example configs. ``stdlib``: a real text-classification corpus -- which standard-library package a
line of Python source comes from -- read from the running interpreter's own standard library.
Everything is deterministic (seeded numpy generators, hashlib, sorted file lists), and every file is
written atomically (a temporary name in the same directory, then ``os.replace``).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import sys
import sysconfig
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from ddp_seq.errors import UserError
from ddp_seq.fileio import write_bytes_atomic

# -- writing -----------------------------------------------------------------------------------------


def _text(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode("utf-8")


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` archive, as ``np.savez`` writes it but with fixed zip timestamps,
    so that the same seed gives byte-identical files (``np.savez`` stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create the output directory ({e.strerror or e})") from None
    return out_dir


# -- samples -----------------------------------------------------------------------------------------

MIN_LEN, MAX_LEN = 5, 60  # steps (or words/tokens) per sample
# Accented words on purpose: the tsv reader must handle UTF-8, and char tokenizers see non-ASCII.
POSITIVE = ("great", "lovely", "delicious", "délicieux", "superb", "friendly", "charming", "fresh", "parfait")
NEGATIVE = ("awful", "bland", "rude", "stale", "naïve", "soggy", "terrible", "cold", "overpriced")
NOUNS = ("café", "crème brûlée", "service", "coffee", "croissant", "jalapeño soup", "waiter", "terrace", "crêpe")
INTENSIFIERS = ("très ", "really ", "quite ", "so ", "")
EVENTS = ("click", "view", "scroll", "buy", "share")
MOTIONS = {"walk": (1.0, 0.6), "run": (2.0, 1.5), "sit": (0.2, 0.1)}  # class: (amplitude, angular frequency)


def _reviews(rng: np.random.Generator, n: int) -> list[str]:
    """``label<TAB>text``: 1-3 clauses; the label is the polarity of the majority of them."""
    lines = []
    for _ in range(n):
        label = str(rng.choice(["pos", "neg"]))
        k = int(rng.integers(1, 4))
        agree = k if k < 3 else int(rng.integers(2, 4))  # 3 clauses: one may disagree, never a tie
        polarities = [label] * agree + ["neg" if label == "pos" else "pos"] * (k - agree)
        rng.shuffle(polarities)
        clauses = [f"the {rng.choice(NOUNS)} was {rng.choice(INTENSIFIERS)}"
                   f"{rng.choice(POSITIVE if p == 'pos' else NEGATIVE)}" for p in polarities]
        text = str(rng.choice([" and ", ", but ", "; "])).join(clauses)
        lines.append(f"{label}\t{text[0].upper()}{text[1:]}.")
    return lines


def _events(rng: np.random.Generator, n: int) -> list[str]:
    """Token sequences labelled with their most frequent token (strictly most frequent)."""
    lines = []
    for _ in range(n):
        length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        top = int(rng.integers(len(EVENTS)))
        p = np.full(len(EVENTS), 0.55 / (len(EVENTS) - 1))
        p[top] = 0.45
        ids = rng.choice(len(EVENTS), size=length, p=p)
        while True:  # break ties (or a lost lead) by turning other tokens into the intended one
            counts = np.bincount(ids, minlength=len(EVENTS))
            if counts[top] > np.delete(counts, top).max():
                break
            ids[rng.choice(np.flatnonzero(ids != top))] = top
        record = {"tokens": [EVENTS[i] for i in ids], "label": EVENTS[top]}
        lines.append(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
    return lines


def _tags(rng: np.random.Generator, n: int) -> list[str]:
    """Two features per step; the tag of a step is ``on`` while the running sum of feature 0 is positive."""
    lines = []
    for _ in range(n):
        length = int(rng.integers(MIN_LEN, MAX_LEN + 1))
        x = np.round(rng.standard_normal((length, 2)), 2)
        running = np.cumsum(x[:, 0])  # of the rounded values, so the tags follow from the file exactly
        record = {"features": x.tolist(), "tags": ["on" if s > 0 else "off" for s in running]}
        lines.append(json.dumps(record, separators=(",", ":")))
    return lines


def _sensors(rng: np.random.Generator, n: int) -> bytes:
    """3 noisy channels; channel ``label`` (one per class) carries a positive offset."""
    lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=n).astype(np.int64)
    labels = rng.integers(0, 3, size=n).astype(np.int64)
    data = rng.standard_normal((int(lengths.sum()), 3)).astype(np.float32)
    data[np.arange(len(data)), np.repeat(labels, lengths)] += 0.7
    return _npz({"data": data, "lengths": lengths, "labels": labels})


def _motions(rng: np.random.Generator, n: int) -> list[str]:
    """UEA/UCR ``.ts``: 3 noisy sines per series; amplitude and frequency depend on the class."""
    names = list(MOTIONS)
    lines = ["@problemName Motions", "@timeStamps false", "@missing false", "@univariate false",
             "@dimensions 3", "@equalLength false", f"@classLabel true {' '.join(names)}", "@data"]
    for _ in range(n):
        label = names[int(rng.integers(len(names)))]
        amplitude, omega = MOTIONS[label]
        t = np.arange(int(rng.integers(MIN_LEN, MAX_LEN + 1)))
        dims = []
        for _ in range(3):
            x = amplitude * np.sin(omega * t + rng.uniform(0, 2 * np.pi)) + 0.3 * rng.standard_normal(len(t))
            dims.append(",".join(f"{v:.2f}" for v in x))
        lines.append(":".join(dims) + f":{label}")
    return lines


# name: (generator, train samples, val samples); the tags and motions steps are wider, hence fewer samples.
SAMPLES = {"reviews.tsv": (_reviews, 600, 150), "events.jsonl": (_events, 600, 150), "tags.jsonl": (_tags, 400, 100),
           "sensors.npz": (_sensors, 600, 150), "motions.ts": (_motions, 400, 100)}


def write_samples(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the sample files (train and ``-val`` of each) into ``out_dir``; returns ``{file name: path}``.

    Every file comes from its own generator, seeded by ``seed`` and the file's place in :data:`SAMPLES`,
    so a file does not change when another is added.
    """
    out_dir = _out_dir(out_dir)
    written = {}
    for k, (name, (make, n_train, n_val)) in enumerate(SAMPLES.items()):
        stem, suffix = name.rsplit(".", 1)
        for split, (n, file) in enumerate(((n_train, name), (n_val, f"{stem}-val.{suffix}"))):
            content = make(np.random.default_rng([seed, k, split]), n)
            data = content if isinstance(content, bytes) else _text(content)
            written[file] = write_bytes_atomic(out_dir / file, data)
    return written


# -- stdlib corpus -----------------------------------------------------------------------------------

# Present in Python 3.10-3.13 (CPython and distro builds alike), pure Python, 1k-10k usable lines each.
STDLIB_PACKAGES = ("asyncio", "concurrent", "email", "http", "importlib", "logging", "multiprocessing",
                   "unittest", "urllib", "xml")
EXCLUDED_DIRS = {"test", "tests", "__pycache__"}
MIN_CHARS, MAX_CHARS = 12, 200  # shorter lines say little (``return x``); longer ones are rare data blobs
VAL_SHARE = 0.15  # of each package's lines, as whole files
MAX_TRAIN_PER_CLASS, MAX_VAL_PER_CLASS = 10000, 2000  # keeps future, larger stdlibs near today's size
STDLIB_FILES = {"train": "stdlib-train.tsv", "val": "stdlib-val.tsv", "stats": "stdlib-stats.json"}


def _stable(text: str) -> int:
    """A hash that is the same in every process (Python's ``hash`` of str is randomised per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _source_lines(path: Path) -> list[str]:
    """The usable lines of one source file: stripped, tabs as spaces, 12-200 printable chars, some alnum."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = []
    for raw in text.splitlines():  # splits on every line boundary, \x0c and \u2028 included
        line = raw.replace("\t", " ").strip()
        if (MIN_CHARS <= len(line) <= MAX_CHARS and line.isprintable() and "\ufffd" not in line
                and any(c.isalnum() for c in line)):
            lines.append(line)
    return lines


def _val_files(files: dict[str, list[str]]) -> set[str]:
    """Files of one package for val: in stable-hash order, those that keep val within 2x its share,
    until it holds ~15% of the lines. Whole files, so near-identical lines of one file never straddle
    the split; a package of one file has no val."""
    total = sum(len(lines) for lines in files.values())
    target = VAL_SHARE * total
    order = sorted((rel for rel in files if files[rel]), key=lambda rel: (_stable(rel), rel))
    chosen, count = set(), 0
    for rel in order:
        if count >= target:
            break
        if count + len(files[rel]) <= 2 * target:
            chosen.add(rel)
            count += len(files[rel])
    if not chosen and len(order) > 1:  # every file is big: the smallest one
        chosen.add(min(order, key=lambda rel: len(files[rel])))
    return chosen


def _cap(lines: list[str], limit: int) -> list[str]:
    """At most ``limit`` lines, chosen by stable hash (deterministic, spread over all files)."""
    if len(lines) <= limit:
        return lines
    keep = set(sorted(lines, key=lambda line: (_stable(line), line))[:limit])
    return [line for line in lines if line in keep]


def write_stdlib_corpus(out_dir: Path, stdlib: Path | None = None) -> dict[str, Any]:
    """Write ``stdlib-train.tsv``, ``stdlib-val.tsv`` (``package<TAB>line``) and ``stdlib-stats.json``.

    The lines come from the ``.py`` files of :data:`STDLIB_PACKAGES` under ``stdlib`` (default: the
    running interpreter's standard library), without ``test``/``tests`` folders. Lines found twice in a
    package are kept once (the train copy wins), lines found in several packages are dropped (no label
    is right). Returns the statistics, ``majority_baseline`` among them: the val accuracy of always
    answering the most frequent training class.
    """
    root = Path(stdlib if stdlib is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise UserError(f"{root}: no such directory (expected a Python standard library)")
    present = [p for p in STDLIB_PACKAGES if (root / p).is_dir()]
    if len(present) < 2:
        raise UserError(f"{root}: holds {len(present)} of the packages {', '.join(STDLIB_PACKAGES)}; "
                        "need at least 2 (is it a Python standard library?)")
    splits: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    file_counts: dict[str, dict[str, int]] = {}
    duplicates = 0
    try:
        for package in present:
            files = {path.relative_to(root).as_posix(): _source_lines(path)
                     for path in sorted((root / package).rglob("*.py"))
                     if path.is_file() and not EXCLUDED_DIRS & set(path.relative_to(root).parts[1:-1])}
            val = _val_files(files)
            file_counts[package] = {"train": sum(1 for rel in files if files[rel] and rel not in val), "val": len(val)}
            seen: set[str] = set()
            for split in ("train", "val"):  # train first: a line in both splits stays in train only
                kept = splits[split].setdefault(package, [])
                for rel in sorted(rel for rel in files if (rel in val) == (split == "val")):
                    for line in files[rel]:
                        if line in seen:
                            duplicates += 1
                        else:
                            seen.add(line)
                            kept.append(line)
    except OSError as e:
        raise UserError(f"{e.filename or root}: cannot read ({e.strerror or e})") from None
    # Lines are unique within a package by now, so a count above 1 means several packages.
    owners = Counter(line for by_package in splits.values() for lines in by_package.values() for line in lines)
    ambiguous = sum(1 for n in owners.values() if n > 1)
    limits = {"train": MAX_TRAIN_PER_CLASS, "val": MAX_VAL_PER_CLASS}
    capped = 0
    for split, by_package in splits.items():
        for package, lines in by_package.items():
            clear = [line for line in lines if owners[line] == 1]
            by_package[package] = _cap(clear, limits[split])
            capped += len(clear) - len(by_package[package])
    counts = {p: {s: len(splits[s][p]) for s in splits} for p in present}
    n_train, n_val = (sum(c[s] for c in counts.values()) for s in ("train", "val"))
    if n_train == 0 or n_val == 0:
        raise UserError(f"{root}: the packages give {n_train} training and {n_val} validation lines; need both")
    majority = min(present, key=lambda p: (-counts[p]["train"], p))  # ties: the first by name
    lengths = [len(line) for split in splits.values() for lines in split.values() for line in lines]
    stats = {"python": platform.python_version(), "stdlib": str(root), "packages": present,
             "missing_packages": [p for p in STDLIB_PACKAGES if p not in present],
             "classes": {p: {**counts[p], "train_files": file_counts[p]["train"], "val_files": file_counts[p]["val"]}
                         for p in present},
             "train_lines": n_train, "val_lines": n_val, "total_lines": n_train + n_val,
             "dropped": {"duplicate": duplicates, "ambiguous": ambiguous, "capped": capped},
             "mean_line_chars": round(sum(lengths) / len(lengths), 1), "max_line_chars": max(lengths),
             "majority_class": majority, "majority_baseline": round(counts[majority]["val"] / n_val, 4),
             "files": dict(STDLIB_FILES)}
    out_dir = _out_dir(out_dir)
    for split, by_package in splits.items():
        rows = [f"{p}\t{line}" for p, lines in by_package.items() for line in lines]
        rows.sort(key=lambda row: (_stable(row), row))  # classes mixed, in an order fixed by content
        write_bytes_atomic(out_dir / STDLIB_FILES[split], _text(rows))
    write_bytes_atomic(out_dir / STDLIB_FILES["stats"], (json.dumps(stats, indent=2) + "\n").encode("utf-8"))
    return stats


# -- command line ------------------------------------------------------------------------------------


def _size(path: Path) -> str:
    n = path.stat().st_size
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddp-seq make-data", description="write data files to train on, "
                                     "generated or read from this Python's standard library (no download)")
    sub = parser.add_subparsers(dest="what", required=True)
    samples = sub.add_parser("samples", help="tiny sample files for every data format (tsv, jsonl, npz, ts)")
    samples.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    stdlib = sub.add_parser("stdlib", help="classify lines of code by standard-library package (tsv)")
    stdlib.add_argument("--stdlib", type=Path, default=None, help="standard library directory (default: this "
                        "Python's)")
    for p in (samples, stdlib):
        p.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``ddp-seq make-data samples|stdlib --out DIR``: write the files, print what was written; 2 on errors."""
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.what == "samples":
            for path in write_samples(args.out, seed=args.seed).values():
                print(f"wrote {path} ({_size(path)})")
            return 0
        stats = write_stdlib_corpus(args.out, stdlib=args.stdlib)
    except UserError as e:
        print(f"ddp-seq: error: {e}", file=sys.stderr, flush=True)
        return 2
    for name in STDLIB_FILES.values():
        print(f"wrote {args.out / name} ({_size(args.out / name)})")
    print(f"Python {stats['python']} standard library ({stats['stdlib']}): {len(stats['packages'])} classes")
    print(f"  {'package':<16} {'train':>7} {'val':>6}")
    for package, c in stats["classes"].items():
        print(f"  {package:<16} {c['train']:>7} {c['val']:>6}")
    print(f"  {'total':<16} {stats['train_lines']:>7} {stats['val_lines']:>6}")
    print(f"line length: mean {stats['mean_line_chars']}, max {stats['max_line_chars']} chars; dropped: "
          + ", ".join(f"{n} {why}" for why, n in stats["dropped"].items()))
    print(f"majority baseline (val accuracy of always '{stats['majority_class']}'): {stats['majority_baseline']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
