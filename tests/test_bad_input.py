"""Bad input through the real CLI: one line on stderr, exit code 2, no traceback, nothing written is lost.

The rule (docs/fault-tolerance.md, "Bad input"): ``ddp-seq: error: ...`` naming the file, line or config key, exit
code 2, no traceback, and the files of a finished run stay byte for byte what they were. One tiny
run is trained first; every case then runs ``train`` with a bad config, data file or checkpoint
next to it (``logging.root`` points at the same root) and must leave that run untouched.

Every path by which an error reaches the user runs as a real process (``Case.launched``): under
torchrun (only rank 0 prints, the worker exits 2), ``python train.py`` failing before torch is
imported (the config cases, a fraction of a second each) and after it (``fp16-on-cpu``, which also
needs ``CUDA_VISIBLE_DEVICES`` hidden, which only a fresh process honours). The other cases differ
from those only in the message and in the files they must leave alone: they run the same handler,
``ddp_seq.cli.main(["train", ...])``, in this process (a torch start-up each saved, as in
tests/test_data_bad_input.py), with the same checks on what it printed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_YAML, python, torchrun

from ddp_seq.cli import main
from ddp_seq.train.checkpoint import FORMAT_VERSION

pytestmark = pytest.mark.slow

ERROR_PREFIX = "ddp-seq: error:"
TABLE_START, TABLE_END = "<!-- bad-input:start -->", "<!-- bad-input:end -->"
TABLE_DOC = REPO / "docs" / "fault-tolerance.md"  # where the bad-input table lives
#: A frame of a Python traceback in ddp_seq's own code (the package or train.py), absolute or relative.
OWN_FRAME = re.compile(r'File "(?:' + re.escape(str(REPO)) + r'[/\\])?(?:ddp_seq[/\\][^"]*|train\.py)", line \d+')
#: What a clear line holds no part of: control characters, terminal escape sequences (``\x1b[1m``).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class CreatesFile:
    """Unpickling this object opens (creates) ``target`` -- the stand-in for arbitrary code."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@dataclass
class GoodRun:
    """A finished single-process run, ``root/good``, whose files no bad input may touch."""

    base: Path
    yaml: Path
    root: Path

    @property
    def dir(self) -> Path:
        return self.root / "good"

    @property
    def checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> GoodRun:
    base = tmp_path_factory.mktemp("bad-input")
    yaml_path = base / "tiny.yaml"
    yaml_path.write_text(TINY_YAML, encoding="utf-8")
    root = base / "runs"
    # Trained in this process: what is checked is that its files stay as they are, not how they were
    # written (tests/test_end_to_end.py launches the real runs).
    assert main(["train", "--config", str(yaml_path), f"logging.root={root}", "logging.name=good",
                 "training.epochs=1"]) == 0
    run = GoodRun(base, yaml_path, root)
    assert run.checkpoint.is_file()
    return run


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` -> its bytes (``None`` for a directory)."""
    return {p.relative_to(directory).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def differences(before: dict[str, bytes | None], after: dict[str, bytes | None]) -> list[str]:
    return ([f"removed {p}" for p in before if p not in after] + [f"added {p}" for p in after if p not in before]
            + [f"changed {p}" for p in before if p in after and before[p] != after[p]])


# -- the cases ------------------------------------------------------------------------------------

@dataclass
class Setup:
    """What one case runs: ``train.py ARGS`` (under torchrun when ``ranks`` > 1) and what the line must name."""

    args: list[str | Path]
    names: list[str]  # substrings the error line must contain (the key, file or line it is about)
    inputs: list[Path] = field(default_factory=list)  # crafted files the run must not alter
    marker: Path | None = None  # a file that must not exist afterwards
    env: dict[str, str] = field(default_factory=dict)  # a launched case's environment
    ranks: int = 1  # > 1: under torchrun (launched)
    after: Callable[[], None] | None = None  # a further check, once the case's own have passed


@dataclass(frozen=True)
class Case:
    name: str
    fragment: str  # the command fragment, as the bad-input table shows it
    build: Callable[[GoodRun, Path], Setup]
    launched: bool = False  # a real process (see the module doc); else main() in this process

    def __str__(self) -> str:
        return self.name


def common(run: GoodRun, *overrides: str | Path, config: Path | None = None) -> list[str | Path]:
    """``--config <tiny yaml> logging.root=<the good run's root> OVERRIDES``."""
    return ["--config", config or run.yaml, f"logging.root={run.root}", *overrides]


def write_npz(path: Path, lengths: list[int], *, bad: tuple[int, float] | None = None, features: int = 3) -> Path:
    """A classify file of ragged sequences (``lengths``); ``bad`` = (flat index into ``data``, value)."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((sum(lengths), features)).astype(np.float32)
    if bad is not None:
        data.reshape(-1)[bad[0]] = bad[1]
    labels = np.arange(len(lengths)) % 2
    np.savez(path, data=data, lengths=np.asarray(lengths, dtype=np.int64), labels=labels)
    return path


LENGTHS = [4, 3, 5, 2, 6, 3, 4, 5, 2, 3]  # sample 2 covers rows 7..11 of 'data'


def npz_case(lengths: list[int], bad: tuple[int, float] | None, *names: str) -> Callable[[GoodRun, Path], Setup]:
    def build(run: GoodRun, tmp: Path) -> Setup:
        path = write_npz(tmp / "train.npz", lengths, bad=bad)
        return Setup(common(run, "data.format=npz", f"data.train_path={path}"), [str(path), *names], [path])
    return build


def config_case(*overrides: str, names: list[str], env: dict[str, str] | None = None, ranks: int = 1
                ) -> Callable[[GoodRun, Path], Setup]:
    def build(run: GoodRun, tmp: Path) -> Setup:
        return Setup(common(run, *overrides), names, env=env or {}, ranks=ranks)
    return build


def missing_data_file(run: GoodRun, tmp: Path) -> Setup:
    absent = tmp / "absent.npz"
    return Setup(common(run, "data.format=npz", f"data.train_path={absent}"), [str(absent), "no such file"])


def missing_config_file(run: GoodRun, tmp: Path) -> Setup:
    absent = tmp / "absent.yaml"
    return Setup(common(run, config=absent), [str(absent), "cannot read config file"])


def yaml_syntax_error(run: GoodRun, tmp: Path) -> Setup:
    path = tmp / "broken.yaml"
    path.write_text("data:\n  num_train: 200\n  num_val: 51: 3\nmodel:\n  hidden: 16\n", encoding="utf-8")
    return Setup(common(run, config=path), [f"{path} line 3", "invalid YAML"], [path])


def copy_of_good(run: GoodRun, tmp: Path) -> Path:
    copy = tmp / "copy.pt"
    shutil.copyfile(run.checkpoint, copy)
    return copy


def truncated_checkpoint(run: GoodRun, tmp: Path) -> Setup:
    path = copy_of_good(run, tmp)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return Setup(common(run, f"checkpoint.resume={path}"), [str(path), "not a loadable"], [path])


def other_model_shape(run: GoodRun, tmp: Path) -> Setup:
    path = copy_of_good(run, tmp)
    return Setup(common(run, f"checkpoint.resume={path}", "model.hidden=32"),
                 [str(path), "model's shape changed since the checkpoint (model.hidden 16 -> 32)"], [path])


def other_format_version(run: GoodRun, tmp: Path) -> Setup:
    path = tmp / "future.pt"
    good_state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    torch.save({**good_state, "format_version": 999}, path)
    return Setup(common(run, f"checkpoint.resume={path}"), [str(path), "format version 999"], [path])


def malicious_pickle(run: GoodRun, tmp: Path) -> Setup:
    def write(marker: Path, path: Path) -> Path:
        torch.save({"format_version": FORMAT_VERSION, "model": {}, "x": CreatesFile(marker)}, path)
        return path

    # control: the payload really runs when the file is unpickled without weights_only
    control = tmp / "control-pwned"
    torch.load(write(control, tmp / "control.pt"), weights_only=False)
    assert control.exists(), "the payload must be live, or this case proves nothing"
    marker, path = tmp / "pwned", write(tmp / "pwned", tmp / "evil.pt")
    return Setup(common(run, f"checkpoint.resume={path}"), [str(path)], [path], marker=marker)


def used_run_name(run: GoodRun, tmp: Path) -> Setup:
    return Setup(common(run, "logging.name=good", "checkpoint.resume=none"), ["logging.name", str(run.dir)])


def fp16_on_cpu(run: GoodRun, tmp: Path) -> Setup:
    """CUDA hidden, so the case means the same on a GPU machine. The same launch shows that a run that
    fails while the job starts leaves no run behind: after fixing the config, its logging.name trains
    (a check of its own launch in test_end_to_end.py before; the retry needs no process of its own)."""
    name = "retry"

    def retry() -> None:
        assert not (run.root / name / "checkpoints").exists(), "the failed start left checkpoints behind"
        assert main(["train", *map(str, common(run, f"logging.name={name}", "training.epochs=1"))]) == 0
        assert (run.root / name / "checkpoints" / "last.pt").is_file()

    return Setup(common(run, f"logging.name={name}", "training.amp=fp16"), ["training.amp", "fp16", "CUDA"],
                 env={"CUDA_VISIBLE_DEVICES": ""}, after=retry)


CASES = [
    Case("unknown-key", "training.lrr=0.1", config_case("training.lrr=0.1", names=["training.lrr", "unknown key"]),
         launched=True),
    Case("mistyped-value", "training.epochs=five",
         config_case("training.epochs=five", names=["training.epochs", "'five'"]), launched=True),
    Case("negative-learning-rate", "training.lr=-0.1", config_case("training.lr=-0.1", names=["training.lr:", "-0.1"]),
         launched=True),
    Case("zero-batch-size", "batching.batch_size=0",
         config_case("batching.batch_size=0", names=["batching.batch_size", "got 0"]), launched=True),
    Case("world-size-larger-than-dataset", "torchrun --nproc_per_node=2 train.py data.num_train=1",
         config_case("data.num_train=1", names=["data.num_train", "2 ranks"], ranks=2), launched=True),
    Case("missing-data-file", "data.format=npz data.train_path=absent.npz", missing_data_file),
    Case("empty-sequence", "data.format=npz data.train_path=train.npz (lengths with a 0)",
         npz_case([4, 3, 0, 5, 2, 6, 3, 4, 5, 2], None, "sample 2 is empty")),
    Case("nan-feature", "data.format=npz data.train_path=train.npz (a NaN in data)",
         npz_case(LENGTHS, (8 * 3 + 1, float("nan")), "sample 2 step 1 feature 1 is nan")),
    Case("inf-feature", "data.format=npz data.train_path=train.npz (an inf in data)",
         npz_case(LENGTHS, (11 * 3 + 2, float("inf")), "sample 2 step 4 feature 2 is +inf")),
    Case("missing-config-file", "--config absent.yaml", missing_config_file, launched=True),
    Case("yaml-syntax-error", "--config broken.yaml (bad line 3)", yaml_syntax_error, launched=True),
    Case("truncated-checkpoint", "checkpoint.resume=copy.pt (cut in half)", truncated_checkpoint),
    Case("checkpoint-of-another-model-shape", "checkpoint.resume=copy.pt model.hidden=32", other_model_shape),
    Case("checkpoint-of-another-format-version", "checkpoint.resume=future.pt (format_version 999)",
         other_format_version),
    Case("malicious-pickle-checkpoint", "checkpoint.resume=evil.pt (pickled code)", malicious_pickle),
    Case("used-run-name-without-resume", "logging.name=good checkpoint.resume=none", used_run_name),
    Case("fp16-on-cpu", "training.amp=fp16 (no GPU)", fp16_on_cpu, launched=True),
]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ERROR_PREFIX in line]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_line_and_loses_nothing(case: Case, good: GoodRun, tmp_path: Path, capsys) -> None:
    setup = case.build(good, tmp_path)
    assert case.launched or (setup.ranks == 1 and not setup.env), "only a launched case has ranks or an environment"
    before = snapshot(good.dir)
    inputs = {p: p.read_bytes() for p in setup.inputs}
    if setup.ranks > 1:
        proc = torchrun("train.py", *setup.args, nproc=setup.ranks, **setup.env)
        # torchrun reports a failed worker with exit code 1; the worker itself exits 2.
        proc.check(1)
        assert re.search(r"exitcode\s*:\s*2\b", proc.stderr), "a worker must exit with code 2\n" + proc.report()
        lines = error_lines(proc.stderr)
        assert len(lines) == 1, f"only rank 0 must print the error, once; got {lines}\n" + proc.report()
        assert error_lines(proc.stdout) == [], proc.report()
        own = OWN_FRAME.findall(proc.stdout + proc.stderr)
        assert not own, f"traceback through ddp_seq code: {own}\n" + proc.report()
        report = proc.report()
    else:
        if case.launched:
            proc = python("train.py", *setup.args, **setup.env).check(2)
            out, err, report = proc.stdout, proc.stderr, proc.report()
        else:
            capsys.readouterr()
            code = main(["train", *map(str, setup.args)])  # an exception here fails the case: no traceback allowed
            out, err = capsys.readouterr()
            report = f"exit code: {code}\n--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}"
            assert code == 2, report
        assert "Traceback" not in out + err, report
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, "stderr must be exactly one line\n" + report
        assert error_lines(out) == [], report
    line = lines[0]
    assert line.startswith(ERROR_PREFIX), report
    assert not CONTROL.search(line), f"the error line holds control characters / terminal escapes: {line!r}"
    for name in setup.names:
        assert name in line, f"the error line must name {name!r}: {line}"
    assert differences(before, snapshot(good.dir)) == [], f"{good.dir} changed\n" + report
    for path, data in inputs.items():
        assert path.read_bytes() == data, f"{path} changed"
    if setup.marker is not None:
        assert not setup.marker.exists(), "loading the checkpoint executed code from the file\n" + report
    if setup.after is not None:
        setup.after()


def test_docs_list_every_case() -> None:
    text = TABLE_DOC.read_text(encoding="utf-8")
    assert text.count(TABLE_START) == 1 and text.count(TABLE_END) == 1, \
        f"{TABLE_DOC.name} needs one {TABLE_START} ... {TABLE_END} block (the bad-input table)"
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0]
    missing = [c.name for c in CASES if c.name not in table]
    assert missing == [], f"cases missing from the bad-input table in {TABLE_DOC.name}: {missing}"
