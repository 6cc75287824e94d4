"""The layers of ddp_seq, read from every module's imports (function-level imports included).

Three layers, each usable without the one above it: the library (``nn/``, ``data/``, ``parallel/``,
``loggers/``, then ``train/``), the builders (``builders.py``: config -> parts), the entry points
(``cli/``, ``bench/``, ``__main__``). Beneath them the shared leaves: ``errors``, ``config``,
``config_fields``, ``fileio``. The rules:

- no import circle;
- a module imports only its own layer or lower ones; the four library foundations (``nn``,
  ``data``, ``parallel``, ``loggers``) import none of each other;
- ``nn/`` and the sampler / collate / loader (``data/`` outside ``data/readers/``) import neither
  the config nor the process group: they are plain PyTorch pieces;
- the training loop (``train/``) imports no reader, builder or command module.

The checker is tested on injected violations too, so a broken rule cannot pass unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ddp_seq"

#: Layer of each top-level name under ``ddp_seq`` (a module or a sub-package); imports only go down
#: or stay level.
RANKS = {"errors": 0, "config_fields": 0, "config": 0, "config_text": 0, "fileio": 0,
         "nn": 1, "data": 1, "parallel": 1, "loggers": 1,
         "train": 2,
         "builders": 3,
         "cli": 4, "bench": 4, "__main__": 4}
#: Rank-1 packages that must stay independent of each other.
FOUNDATIONS = ("nn", "data", "parallel", "loggers")
#: Plain PyTorch pieces: no config, no process group.
PLAIN = ("ddp_seq.nn", "ddp_seq.data.sampler", "ddp_seq.data.collate", "ddp_seq.data.loader")
CONFIG_OR_GROUP = ("ddp_seq.config", "ddp_seq.config_fields", "ddp_seq.parallel.process_group")
#: What the training loop never imports.
NOT_FOR_TRAIN = ("ddp_seq.data.readers", "ddp_seq.builders", "ddp_seq.cli", "ddp_seq.bench")


def modules(root: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package's __init__)}`` of every module under ``root``."""
    found = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return found


def import_edges(root: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, at any depth of its code."""
    mods = modules(root)
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, (path, is_init) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    package = name.split(".") if is_init else name.split(".")[:-1]
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                while parts and ".".join(parts) not in mods:
                    parts.pop()
                found = ".".join(parts)
                if found and found != name and found != root.name:
                    edges[name].add(found)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def top(name: str) -> str:
    """The top-level module or sub-package of ``ddp_seq.<top>...``."""
    return name.split(".")[1]


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every broken rule, one line each (empty when the layers hold)."""
    found = [f"import circle: {' -> '.join(group)}" for group in cycles(edges)]
    for source in sorted(edges):
        if source == "ddp_seq":  # the public API: names resolved lazily, no imports
            continue
        for target in sorted(edges[source]):
            a, b = top(source), top(target)
            if a not in RANKS or b not in RANKS:
                found.append(f"{source} -> {target}: {a if a not in RANKS else b} has no layer in RANKS")
                continue
            if RANKS[b] > RANKS[a]:
                found.append(f"{source} -> {target}: layer {RANKS[a]} imports layer {RANKS[b]}")
            elif a != b and a in FOUNDATIONS and b in FOUNDATIONS:
                found.append(f"{source} -> {target}: library foundations import none of each other")
            if within(source, PLAIN) and within(target, CONFIG_OR_GROUP):
                found.append(f"{source} -> {target}: a plain PyTorch piece imports the config or the process group")
            if within(source, PLAIN) and within(target, ("ddp_seq.data.readers",)):
                found.append(f"{source} -> {target}: the sampler and collate import no reader")
            if within(source, ("ddp_seq.train",)) and within(target, NOT_FOR_TRAIN):
                found.append(f"{source} -> {target}: the training loop imports no reader, builder or command")
    return found


def test_the_layers_hold():
    assert violations(import_edges()) == []


@pytest.mark.parametrize("source, target, words", [
    ("ddp_seq.nn.rnn", "ddp_seq.config", "imports the config or the process group"),
    ("ddp_seq.nn.rnn", "ddp_seq.parallel.process_group", "foundations"),
    ("ddp_seq.data.collate", "ddp_seq.parallel.process_group", "plain PyTorch piece"),
    ("ddp_seq.data.sampler", "ddp_seq.data.readers.sources", "import no reader"),
    ("ddp_seq.loggers.records", "ddp_seq.train.objective", "layer 1 imports layer 2"),
    ("ddp_seq.train.trainer", "ddp_seq.builders", "layer 2 imports layer 3"),
    ("ddp_seq.train.trainer", "ddp_seq.data.readers.sources", "the training loop imports no reader"),
    ("ddp_seq.builders", "ddp_seq.cli.rundir", "layer 3 imports layer 4"),
    ("ddp_seq.train.state", "ddp_seq.train.trainer", "import circle"),
])
def test_the_checker_catches_each_kind_of_violation(source, target, words):
    edges = {k: set(v) for k, v in import_edges().items()}
    edges[source].add(target)
    found = violations(edges)
    assert any(words in line for line in found), found


def test_relative_and_function_level_imports_count(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .sub import b\n")
    (package / "sub" / "b.py").write_text("from .. import a\nimport pkg.sub\n")
    edges = import_edges(package)
    assert edges["pkg.a"] == {"pkg.sub", "pkg.sub.b"} and edges["pkg.sub.b"] == {"pkg.a", "pkg.sub"}
    assert cycles(edges) == [["pkg.a", "pkg.sub.b"]]


def test_the_folders_show_the_layers():
    """At most 8 modules at the top, at least 5 sub-packages, each with a README saying what it holds."""
    top_modules = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert len(top_modules) <= 8, top_modules
    assert len(packages) >= 5, packages
    assert set(RANKS) == {Path(m).stem for m in top_modules} | set(packages)  # every module has a layer
    for folder in [PACKAGE / name for name in packages] + [PACKAGE / "data" / "readers"]:
        assert (folder / "README.md").is_file(), f"{folder} has no README.md"
