#!/usr/bin/env python3
"""``make gpu-check``: every CUDA path of ddp_seq and the GPU benchmark, in one command of under 8 minutes.

GPU time is scarce and short (issue 28), so this check is prepared before a GPU is there. It runs
from the working tree as it is, with nothing installed (no ``pip install -e``, no virtualenv, no
torch pin, no wandb: tracking stays off), from the repository root::

    PYTHONPATH=. python3 launch/gpu_check.py            # what make gpu-check runs

Its parts, each with a time cap, all within one budget (``--budget-s``, default 450 s):

- ``env``: torch, CUDA, the device and its capability, cuDNN, NCCL, native bf16, the optional
  packages; that importing ddp_seq's commands imports no wandb;
- ``gpu-tests``: ``pytest -m gpu`` over the test files that hold gpu-marked tests;
- ``smoke``: the default task, tiny, on the GPU, for LSTM/GRU x uni/bi x packed/padded x
  ``training.amp`` none/bf16/fp16/auto (32 runs in one process);
- ``cli``: ``torchrun`` train (1 rank), then ``evaluate``, ``predict`` and ``export`` (ONNX) from
  that CUDA checkpoint, each a process of its own, as users run them;
- ``resume``: a CUDA checkpoint resumed on the CPU, and that run's checkpoint resumed on the GPU;
- ``dp``: ``training.mode=dp`` on the device (one GPU: DataParallel's single-device path);
- ``parity``: ``ddp-seq parity`` (single vs dp vs ddp on a fixed batch);
- ``bench``: ``ddp-seq bench --suite gpu`` (ddp_seq/bench/suite.py): the reference loop on the GPU
  against ddp_seq's default and its batching x execution matrix on the default workload, a larger
  network in fp32 and bf16, the short workload, with the step-time breakdown; the cuDNN
  execution-path matrix;
- ``scaling``: the default workload on the CPU (CUDA hidden) with 1, 2, 4 and 8 gloo ranks.

The correctness parts run side by side (``--jobs``; they measure nothing), then the two timing
parts one at a time, alone on the machine (in the dry mode, which measures nothing, they join the
others). Every command is a real process, killed with all its
descendants at its part's cap, so one crash or hang costs its own part and nothing else. Each part
prints ONE line -- ``gpu-check PART pass|FAIL|skipped SECONDS figures`` -- so the output's tail
tells the story; its full log is ``PART.log`` in the output folder (``--out``, default
``runs/gpu-check/<date>-<time>``), beside ``summary.json``. The benchmark's figures go to
``bench/results/<date>-<gpu>.json`` (and a PNG per part), and BENCHMARKS.md is regenerated with a
GPU section and a CPU scaling section.

Without a CUDA GPU (or with ``--dry``) the same harness runs in a dry mode: tiny sizes on the CPU,
2 ranks at most, the benchmark as ``--quick``; what needs CUDA (the gpu-tests part, fp16) is
skipped and said so; its results and BENCHMARKS.md stay in the output folder. tests/test_gpu_check.py
runs it. ``--fail PART`` / ``--hang PART`` inject a failing or hanging step (tests).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# ddp_seq from this working tree, also when the script is started without PYTHONPATH=. (the
# commands it starts get it through child_env).
sys.path.insert(0, str(REPO))
CONFIG = "configs/default.yaml"
#: Variables torchrun sets for its workers: a child must never inherit stale ones.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
#: Seconds kept back from the budget for writing the results after the last part.
RESERVE_S = 10.0
#: A part is not started with less than this left of the budget: it could not finish anything.
MIN_PART_S = 15.0


@dataclass(frozen=True)
class Spec:
    """One part: its name, the most seconds it may take, and whether it measures speed (timing
    parts run alone, after the others)."""

    name: str
    cap_s: float
    timing: bool = False


#: In the order they run (the correctness parts side by side). Estimated on one H100 (not yet
#: measured there): env 10 s, gpu-tests 40, smoke 60, cli 50, resume 30, dp 15, parity 30 -- about
#: 90 s side by side -- then bench ~200 s and scaling ~70 s: ~370 s of the 450 s budget. The caps
#: bound what a slow or hung part can take.
SPECS = (Spec("env", 60), Spec("gpu-tests", 150), Spec("smoke", 150), Spec("cli", 150), Spec("resume", 120),
         Spec("dp", 90), Spec("parity", 120), Spec("bench", 230, timing=True), Spec("scaling", 100, timing=True))
PART_NAMES = tuple(spec.name for spec in SPECS)

#: The default task, small: a checkpoint that has learned something in seconds on a GPU.
GPU_SIZES = ("data.num_train=2000", "data.num_val=500", "training.epochs=2")
#: The smoke matrix's runs on a GPU: a few steps of the default task's shapes (lengths up to 400).
GPU_SMOKE = ("data.num_train=512", "data.num_val=256", "training.epochs=1", "model.hidden=64")
#: The dry mode's sizes: about a second of training on one CPU core. One thread per process: such
#: tiny steps gain nothing from a second one, and on a busy 2-core machine threads that wait for
#: each other made a tiny run up to 80x slower.
DRY_SIZES = ("data.num_train=128", "data.num_val=64", "data.max_length=60", "model.hidden=16", "model.layers=1",
             "batching.batch_size=32", "training.warmup_steps=2", "training.epochs=1",
             "distributed.threads_per_rank=1")
#: Every run of the check: quiet progress, and nothing it does is tracked (no wandb on the GPU machine).
QUIET = ("logging.progress=none",)
#: The smoke matrix: cell x direction x execution path x training.amp.
SMOKE_AXES = (("lstm", "gru"), ("uni", "bi"), ("packed", "padded"), ("none", "bf16", "fp16", "auto"))
#: CPU scaling: gloo ranks on the GPU machine's 16 cores; the dry mode stays within 2 cores.
SCALING_RANKS, DRY_SCALING_RANKS = (1, 2, 4, 8), (1, 2)

#: --hang's step: a child in a session of its own (as torchrun's workers are), then sleep; the
#: part's cap must end both.
HANG_CODE = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '600'], start_new_session=True); "
             "print('hanging; child pid', child.pid, flush=True); time.sleep(600)")
FAIL_CODE = "import sys; print('injected failure', flush=True); sys.exit(3)"


class PartFailed(Exception):
    """A part's check did not hold; the message is its summary line's figures."""


class PartSkipped(Exception):
    """A part cannot run here (e.g. it needs CUDA); the message says why."""


@dataclass
class Outcome:
    """What one part ended with: the line it prints and the figures summary.json keeps."""

    name: str
    status: str  # pass | FAIL | skipped
    seconds: float
    summary: str
    details: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        return f"gpu-check {self.name:<9} {self.status:<7} {self.seconds:6.1f}s  {self.summary}"


# -- processes ----------------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, at any depth (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` and everything below it, by pid: torchrun starts each worker in a session of
    its own, out of reach of a signal to the launcher's process group. The tree is read before any
    kill, since a killed parent's children move to init and could no longer be found."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of every command: the repository importable, unbuffered output, tracking
    off (the GPU machine has no wandb), no launcher variables of a surrounding torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env["WANDB_MODE"] = "disabled"
    env.update(extra)
    return env


# -- the check ----------------------------------------------------------------------------------------

@dataclass
class Check:
    """One run of the check: where it writes, what it runs, its clock."""

    out: Path
    dry: bool
    budget_s: float
    fail: set[str]
    hang: set[str]
    caps: dict[str, float]
    start: float = field(default_factory=time.monotonic)
    cuda: bool = False
    env: dict[str, str] = field(default_factory=dict)  # variables for every command (--dry hides CUDA)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def deadline(self) -> float:
        return self.start + self.budget_s - RESERVE_S

    def sizes(self) -> tuple[str, ...]:
        return DRY_SIZES if self.dry else GPU_SIZES

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)


class Part:
    """One part while it runs: its log, its deadline, and its steps (real processes)."""

    def __init__(self, check: Check, spec: Spec) -> None:
        self.check, self.spec = check, spec
        now = time.monotonic()
        self.deadline = min(now + check.caps.get(spec.name, spec.cap_s), check.deadline)
        self.limit_s = self.deadline - now  # its cap, or what is left of the budget if less
        self.log = check.out / f"{spec.name}.log"
        self.dir = check.out / spec.name
        self.dir.mkdir(parents=True, exist_ok=True)

    def step(self, label: str, cmd: list[str], env: dict[str, str] | None = None) -> str:
        """Run ``cmd`` to its end or to the part's deadline; its output goes to the part's log and is
        returned. Raises :class:`PartFailed` naming the step on a non-zero exit or at the deadline."""
        cmd, start = [str(c) for c in cmd], time.monotonic()
        with self.log.open("ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            offset = self.log.stat().st_size  # the child appends through the same file: sizes, not tell()
            proc = subprocess.Popen(cmd, cwd=REPO, env=child_env({**self.check.env, **(env or {})}), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                code = proc.wait(timeout=max(0.1, self.deadline - start))
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                proc.wait()
                code = None
            end = self.log.stat().st_size
            log.write(f"# {label}: exit {code} after {time.monotonic() - start:.1f}s\n".encode())
        with self.log.open("rb") as log:
            log.seek(offset)
            text = log.read(end - offset).decode(errors="replace")
        if code is None:
            raise PartFailed(f"{label}: killed at the part's time cap ({self.limit_s:.0f}s); {last_line(text)}")
        if code != 0:
            raise PartFailed(f"{label}: exit {code}: {last_line(text)}")
        return text

    def python(self, label: str, *args: Any, env: dict[str, str] | None = None) -> str:
        return self.step(label, [sys.executable, *args], env)

    def worker(self, name: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
        """This script's ``--worker NAME`` in a process of its own; the JSON it wrote."""
        flags = ["--dry"] if self.check.dry else []
        self.python(name, __file__, "--worker", name, "--dir", self.dir, *flags, *args, env=env)
        return read_json(self.dir / f"{name}.json")


def last_line(text: str) -> str:
    """The last non-empty line of a command's output (where tracebacks and verdicts end)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    """Written whole or not at all (a worker may be killed while it writes)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def run_part(check: Check, spec: Spec) -> Outcome:
    """Run one part and print its line; a part's failure, hang or skip never reaches the others."""
    start = time.monotonic()
    if check.deadline - start < MIN_PART_S:
        outcome = Outcome(spec.name, "skipped", 0.0, f"no time left in the {check.budget_s:.0f}s budget")
    else:
        part = Part(check, spec)
        try:
            inject(part)
            summary, details = PARTS[spec.name](part)
            outcome = Outcome(spec.name, "pass", 0.0, summary, details)
        except PartSkipped as e:
            outcome = Outcome(spec.name, "skipped", 0.0, str(e))
        except PartFailed as e:
            outcome = Outcome(spec.name, "FAIL", 0.0, str(e))
        except Exception as e:  # noqa: BLE001 -- the check's own error in one part must not stop the others
            outcome = Outcome(spec.name, "FAIL", 0.0, f"the check itself: {type(e).__name__}: {e}")
        outcome.seconds = time.monotonic() - start
    check.say(outcome.line())
    return outcome


def inject(part: Part) -> None:
    """--fail / --hang: a step that fails or hangs, run as any other step (tests)."""
    if part.spec.name in part.check.fail:
        part.python("injected failure", "-c", FAIL_CODE)
    if part.spec.name in part.check.hang:
        part.python("injected hang", "-c", HANG_CODE)


# -- the parts ----------------------------------------------------------------------------------------

Result = tuple[str, dict[str, Any]]


def part_env(part: Part) -> Result:
    facts = part.worker("env")
    m = facts["machine"]
    if facts["wandb_imported"]:
        raise PartFailed("importing ddp_seq's commands imported wandb (it must stay lazy)")
    where = (f"{m['device']} (sm_{facts['capability']}), CUDA {facts['cuda_version']}, cuDNN {facts['cudnn']}, "
             f"NCCL {'yes' if facts['nccl'] else 'no'}" if facts["cuda"] else "no CUDA GPU: dry mode")
    packages = ", ".join(f"{name} {'yes' if there else 'no'}" for name, there in facts["packages"].items())
    summary = (f"torch {facts['torch']}, Python {m['python']}, {m['cores']} cores; {where}; "
               f"native bf16: {facts['bf16'] or 'no'}; {packages}; tracking off (WANDB_MODE=disabled)")
    return summary, facts


def part_gpu_tests(part: Part) -> Result:
    if not part.check.cuda:
        raise PartSkipped("needs CUDA (the gpu-marked tests skip without it)")
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                   if "pytest.mark.gpu" in p.read_text(encoding="utf-8"))
    text = part.python("pytest -m gpu", "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files)
    counts = pytest_counts(text)
    if not counts.get("passed"):
        raise PartFailed(f"no gpu-marked test passed: {last_line(text)}")
    return f"{last_line(text)} ({len(files)} files)", {"counts": counts, "files": files}


def pytest_counts(text: str) -> dict[str, int]:
    """``{"passed": 12, "skipped": 1, ...}`` from pytest's final summary line."""
    lines = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed|error)", line)]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", lines[-1])} if lines else {}


def part_smoke(part: Part) -> Result:
    try:
        report = part.worker("smoke")
    except PartFailed as e:  # killed or crashed: what the runs before it wrote still counts
        partial = part.dir / "smoke.json"
        if not partial.exists():
            raise
        report = read_json(partial)
        raise PartFailed(f"{e}; {smoke_figures(report)}") from None
    failed = [r for r in report["runs"] if not r["ok"]]
    if failed:
        first = failed[0]
        raise PartFailed(f"{len(failed)} of {len(report['runs'])} runs failed, first {first['name']}: {first['error']}")
    return smoke_figures(report), report


def smoke_figures(report: dict[str, Any]) -> str:
    runs = report["runs"]
    ok = [r for r in runs if r["ok"]]
    metrics = [r["val_accuracy"] for r in ok]
    seconds = [r["seconds"] for r in ok]
    text = f"{len(ok)}/{len(runs)} runs trained on {report['device']} (lstm/gru x uni/bi x packed/padded x amp)"
    if ok:
        text += (f", val_accuracy {min(metrics):.3f}-{max(metrics):.3f}, {min(seconds):.1f}-{max(seconds):.1f}s each,"
                 f" amp=auto -> {report.get('auto', '?')}")
    if report["skipped"]:
        text += f"; skipped {len(report['skipped'])} ({'; '.join(sorted(set(report['skipped'].values())))})"
    return text


def device_of(text: str) -> str:
    """The device the trainer said it trained on (its first log line)."""
    found = re.search(r"world size \d+, device (\S+),", text)
    return found.group(1) if found else "?"


def expect_device(text: str, cuda: bool, label: str) -> str:
    device = device_of(text)
    if device.startswith("cuda") != cuda:
        raise PartFailed(f"{label} trained on {device}, expected {'cuda' if cuda else 'cpu'}")
    return device


def epochs_of(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


def train_cmd(run_root: Path, name: str, *overrides: str) -> list[str]:
    return ["-m", "ddp_seq", "train", "--config", CONFIG, *overrides, *QUIET, f"logging.root={run_root}",
            f"logging.name={name}"]


def part_cli(part: Part) -> Result:
    check, root = part.check, part.dir / "runs"
    text = part.step("train (torchrun, 1 rank)", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node=1", *train_cmd(root, "cli", *check.sizes())])
    device = expect_device(text, check.cuda, "train")
    best, trained = root / "cli" / "checkpoints" / "best.pt", max(r["val_accuracy"] for r in epochs_of(root / "cli"))
    part.python("evaluate", "-m", "ddp_seq", "evaluate", "--checkpoint", best, "--output", part.dir / "eval.json")
    evaluated = read_json(part.dir / "eval.json")["accuracy"]
    labels = write_val_npz(part.dir / "val.npz", check.sizes())
    predictions = part.dir / "predictions.jsonl"
    part.python("predict", "-m", "ddp_seq", "predict", "--checkpoint", best, "--input", part.dir / "val.npz",
                "--output", predictions, "data.format=npz", f"data.train_path={part.dir / 'val.npz'}")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    predicted = sum(str(r["prediction"]) == str(y) for r, y in zip(rows, labels)) / max(1, len(labels))
    export = part.python("export", "-m", "ddp_seq", "export", "--checkpoint", best, "--format", "onnx", "--output",
                         part.dir / "model.onnx")
    onnx_kib = (part.dir / "model.onnx").stat().st_size / 1024
    figures = {"device": device, "train_val_accuracy": trained, "evaluate_accuracy": evaluated,
               "predict_rows": len(rows), "predict_accuracy": predicted, "onnx_kib": onnx_kib}
    summary = (f"train on {device} val_accuracy {trained:.4f}; evaluate {evaluated:.4f}; predict {len(rows)} rows, "
               f"accuracy {predicted:.4f}; export onnx {onnx_kib:.0f} KiB ({last_line(export)[:80]})")
    if len(rows) != len(labels) or abs(evaluated - trained) > 0.01 or abs(predicted - evaluated) > 0.01:
        raise PartFailed("disagree: " + summary)
    return summary, figures


def part_resume(part: Part) -> Result:
    """Epoch 1 on the GPU, epoch 2 resumed from it on the CPU, epoch 3 resumed from that on the GPU."""
    check, root = part.check, part.dir / "runs"
    devices = []
    for epochs, on_gpu in ((1, True), (2, False), (3, True)):
        env = None if on_gpu else {"CUDA_VISIBLE_DEVICES": ""}
        label = f"epoch {epochs} on {'the GPU' if on_gpu else 'the CPU'}"
        text = part.python(label, *train_cmd(root, "resume", *check.sizes(), f"training.epochs={epochs}"), env=env)
        devices.append(expect_device(text, check.cuda and on_gpu, label))
        if epochs > 1 and "resuming from" not in text:
            raise PartFailed(f"{label}: did not resume ({last_line(text)})")
    epochs = epochs_of(root / "resume")
    losses = [r["train_loss"] for r in epochs]
    if [r["epoch"] for r in epochs] != [1, 2, 3] or not all(map(math.isfinite, losses)):
        raise PartFailed(f"epochs {[r['epoch'] for r in epochs]}, train_loss {losses}")
    summary = (f"{' -> '.join(devices)}: epochs 1, 2, 3 each once, train_loss "
               f"{' '.join(f'{x:.4f}' for x in losses)}, val_accuracy {epochs[-1]['val_accuracy']:.4f}")
    return summary, {"devices": devices, "train_loss": losses}


def write_val_npz(path: Path, sizes: tuple[str, ...]) -> list[int]:
    """The default task's validation split as an npz file (``predict``'s input); its labels. Made
    here, not in a process of its own: the synthetic task needs numpy and the config, not torch."""
    import numpy as np

    from ddp_seq.config import load_config
    from ddp_seq.data.readers.synthetic import make_synthetic

    val = make_synthetic(load_config(CONFIG, list(sizes)).data, "val")
    np.savez(path, data=val.values, offsets=val.offsets)
    return [int(y) for y in val.targets]


def part_dp(part: Part) -> Result:
    root = part.dir / "runs"
    text = part.python("train training.mode=dp", *train_cmd(root, "dp", *part.check.sizes(), "training.mode=dp"))
    device = expect_device(text, part.check.cuda, "dp")
    if "mode dp" not in text:
        raise PartFailed(f"the run did not say mode dp: {last_line(text)}")
    last = epochs_of(root / "dp")[-1]
    return (f"DataParallel on {device}: val_accuracy {last['val_accuracy']:.4f}, {last['tokens_per_s']:,.0f} tok/s",
            {"device": device, "val_accuracy": last["val_accuracy"]})


def part_parity(part: Part) -> Result:
    text = part.python("ddp-seq parity", "-m", "ddp_seq", "parity")
    verdict = next((line for line in reversed(text.splitlines()) if line.startswith("parity: ")), last_line(text))
    return verdict, {"verdict": verdict}


def part_bench(part: Part) -> Result:
    result = timing_worker(part, "bench")
    return failed_rows(result, bench_figures(result)), {"failed": result.get("failed", {})}


def part_scaling(part: Part) -> Result:
    result = timing_worker(part, "scaling", env={"CUDA_VISIBLE_DEVICES": ""})
    rows = result["parts"].get("scaling", {}).get("variants", {})
    text = "; ".join(f"{name} {row['tokens_per_s']:,.0f} tok/s ({ratio(rows, name, next(iter(rows)))}, sync "
                     f"{pct(row.get('sync_share'))})" for name, row in rows.items())
    left_out = ", ".join(str(n) for n in SCALING_RANKS if n not in result["ranks"])
    text += f"; {left_out} ranks skipped (dry mode: 2 cores)" if left_out else ""
    return failed_rows(result, text or "no row finished"), {"ranks": result["ranks"]}


def failed_rows(result: dict[str, Any], figures: str) -> str:
    """``figures``, or :class:`PartFailed` with them when a row of the suite failed (the suite ran on)."""
    failed = result.get("failed", {})
    if failed or not result.get("parts"):
        first = next(iter(failed.items()), ("no row finished", ""))
        raise PartFailed(f"{len(failed)} row(s) failed, first {first[0]}: {last_line(first[1])}; {figures}")
    return figures


def timing_worker(part: Part, name: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """A benchmark worker; cut at its cap, the rows it finished are kept (its progress file) and the
    part fails saying so."""
    try:
        return part.worker(name, env=env)
    except PartFailed as e:
        salvaged = salvage(part.dir / f"{name}.partial.json", name)
        if salvaged is None:
            raise
        write_json(part.dir / f"{name}.json", salvaged)
        rows = sum(len(p["variants"]) for p in salvaged["parts"].values())
        raise PartFailed(f"{e}; kept the {rows} finished rows") from None


def salvage(progress: Path, name: str) -> dict[str, Any] | None:
    """The finished rows of a suite cut short, summarised as a whole run would be (None if none)."""
    if not progress.exists():
        return None
    from ddp_seq.bench.suite import SUITES, finish_parts, scaling_part

    partial = read_json(progress)
    parts = SUITES["gpu"] if name == "bench" else {"scaling": scaling_part(tuple(partial["ranks"]))}
    finished = finish_parts(parts, partial["runs"], partial["base_overrides"], partial["monitors"])
    return {**partial, "parts": finished, "complete": False} if finished else None


def pct(share: float | None) -> str:
    return "—" if share is None else f"{100 * share:.0f}%"


def ratio(rows: dict[str, Any], a: str, b: str) -> str:
    if a not in rows or b not in rows:
        return "—"
    return f"{rows[a]['tokens_per_s'] / rows[b]['tokens_per_s']:.2f}x"


def bench_figures(result: dict[str, Any]) -> str:
    """The headline ratios: ddp_seq's default against the reference, the other execution path, bf16."""
    from ddp_seq.bench.report import other_path

    out = []
    parts = result.get("parts", {})
    for name, part in parts.items():
        rows, default = part["variants"], part["default"]
        row, baseline = rows[default], part["baseline"]
        text = f"{name}: {default} {row['tokens_per_s']:,.0f} tok/s"
        text += f", {ratio(rows, default, baseline)} {baseline}" if baseline != default else ""
        for label, other in (("the other path", other_path(default)),
                             ("random batches", default.replace("bucket", "random"))):
            text += f", {ratio(rows, default, other)} {label}" if other in rows and other != default else ""
        bf16 = f"{default}, bf16"
        text += f", bf16 {ratio(rows, bf16, default)} fp32" if bf16 in rows else ""
        if row.get("step_ms") is not None:
            text += f", step {row['step_ms']:.1f} ms (sync {pct(row.get('sync_share'))})"
        out.append(text)
    rows = sum(len(p["variants"]) for p in parts.values())
    return "; ".join(out) + f" ({rows} rows, {len(result.get('skipped', {}))} skipped)"


PARTS: dict[str, Callable[[Part], Result]] = {
    "env": part_env, "gpu-tests": part_gpu_tests, "smoke": part_smoke, "cli": part_cli, "resume": part_resume,
    "dp": part_dp, "parity": part_parity, "bench": part_bench, "scaling": part_scaling}


# -- workers: what runs inside one process of its own -------------------------------------------------

def worker_env(out: Path, dry: bool, args: list[str]) -> None:
    import importlib.util

    import torch
    import torch.distributed as dist

    import ddp_seq.builders  # noqa: F401 -- what the commands import: none of it may import wandb
    import ddp_seq.cli  # noqa: F401
    import ddp_seq.train.trainer  # noqa: F401
    from ddp_seq.bench import machine
    from ddp_seq.train.amp import native_bf16

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    capability = "".join(map(str, torch.cuda.get_device_capability(device))) if cuda else None
    packages = {name: importlib.util.find_spec(module) is not None for name, module in (
        ("wandb", "wandb"), ("onnxruntime", "onnxruntime"), ("lightning", "pytorch_lightning"),
        ("tensorboard", "tensorboard"), ("matplotlib", "matplotlib"))}
    write_json(out / "env.json", {
        "machine": machine(), "cuda": cuda, "torch": torch.__version__, "cuda_version": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "capability": capability,
        "nccl": dist.is_nccl_available(), "bf16": native_bf16(device), "packages": packages,
        "wandb_imported": "wandb" in sys.modules})


def smoke_runs() -> list[tuple[str, list[str]]]:
    """``(name, overrides)`` of each run of the smoke matrix."""
    runs = []
    for cell, direction, execution, amp in itertools.product(*SMOKE_AXES):
        name = f"{cell} {direction} {execution} {amp}"
        runs.append((name, [f"model.cell={cell}", f"model.bidirectional={str(direction == 'bi').lower()}",
                            f"model.execution={execution}", f"training.amp={amp}"]))
    return runs


def worker_smoke(out: Path, dry: bool, args: list[str]) -> None:
    """Every run of the matrix in this process (a process start costs more than a tiny run), through
    ``ddp_seq.cli.train``, what ``python -m ddp_seq train`` calls. One run's error is recorded and
    the next one runs; the report is rewritten after each, so a kill keeps what was done."""
    import torch

    from ddp_seq.cli import train
    from ddp_seq.config import load_config

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {"device": "cuda:0" if cuda else "cpu", "runs": [], "skipped": {}}
    for name, overrides in smoke_runs():
        if "training.amp=fp16" in overrides and not cuda:
            report["skipped"][name] = "fp16 needs CUDA"
            continue
        run_name = name.replace(" ", "-")
        cfg = load_config(CONFIG, [*(DRY_SIZES if dry else GPU_SMOKE), *overrides, *QUIET, "checkpoint.save=false",
                                   f"logging.root={out / 'runs'}", f"logging.name={run_name}"])
        start = time.monotonic()
        try:
            train(cfg)
            last = epochs_of(out / "runs" / run_name)[-1]
            if not math.isfinite(last["train_loss"]):
                raise RuntimeError(f"train_loss {last['train_loss']}")
            log = (out / "runs" / run_name / "train.log").read_text()
            if "training.amp=auto" in overrides:
                report["auto"] = "bf16" if "training.amp=auto: bf16" in log else "fp32"
            row = {"ok": True, "val_accuracy": last["val_accuracy"], "device": device_of(log), "error": None}
        except Exception as e:  # noqa: BLE001 -- one run's failure is a figure; the others still run
            row = {"ok": False, "val_accuracy": None, "device": None, "error": f"{type(e).__name__}: {e}"[:300]}
            print(f"smoke {name}: FAILED {row['error']}", flush=True)
        report["runs"].append({"name": name, "seconds": time.monotonic() - start, **row})
        write_json(out / "smoke.json", report)
    write_json(out / "smoke.json", report)


def worker_bench(out: Path, dry: bool, args: list[str]) -> None:
    """``ddp-seq bench --suite gpu`` (one repeat: the budget) and the execution-path matrix. The dry
    mode runs the first part as ``--quick`` and checks the other parts' configs: at tiny sizes on a
    CPU their rows would test the same runners again, at seconds a launch."""
    from ddp_seq.bench import execution_matrix, render_text
    from ddp_seq.bench.suite import QUICK, SUITES, run_suite
    from ddp_seq.config import load_config

    def progress(partial: dict[str, Any]) -> None:
        write_json(out / "bench.partial.json", partial)

    parts = dict(list(SUITES["gpu"].items())[:1]) if dry else SUITES["gpu"]
    result = run_suite("gpu", 1, dry, CONFIG, on_progress=progress, parts=parts, keep_going=True)
    for name, part in SUITES["gpu"].items() if dry else ():
        for row in part.variants if name not in parts else ():
            load_config(CONFIG, [*part.base, *QUICK, *row.overrides])
            result["config_only"][f"{name}: {row.name}"] = "dry mode: config checked, not run"
    result["execution"] = execution_matrix(1 if dry else 3, dry)
    print(render_text(result), flush=True)
    write_json(out / "bench.json", result)


def worker_scaling(out: Path, dry: bool, args: list[str]) -> None:
    """The default workload on 1, 2, 4, 8 gloo ranks (the part hides CUDA)."""
    from ddp_seq.bench import render_text
    from ddp_seq.bench.suite import run_suite, scaling_part

    ranks = DRY_SCALING_RANKS if dry else SCALING_RANKS

    def progress(partial: dict[str, Any]) -> None:
        write_json(out / "scaling.partial.json", {**partial, "ranks": list(ranks)})

    result = run_suite("scaling", 1, dry, CONFIG, on_progress=progress, parts={"scaling": scaling_part(ranks)},
                       keep_going=True)
    print(render_text(result), flush=True)
    write_json(out / "scaling.json", {**result, "ranks": list(ranks)})


WORKERS: dict[str, Callable[[Path, bool, list[str]], None]] = {
    "env": worker_env, "smoke": worker_smoke, "bench": worker_bench, "scaling": worker_scaling}


# -- results ------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3`` (a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def benchmark_result(check: Check, machine: dict[str, Any], outcomes: list[Outcome]) -> dict[str, Any] | None:
    """The bench and scaling parts' figures as one result in ``ddp-seq bench``'s shape (report.py
    renders it), or None when neither left any."""
    found = {name: check.out / name / f"{name}.json" for name in ("bench", "scaling")}
    bench, scaling = ({} if not path.exists() else read_json(path) for path in found.values())
    if not bench.get("parts") and not scaling.get("parts"):
        return None
    return {"suite": "gpu-check", "complete": True, "quick": check.dry, "repeats": 1, "config": CONFIG,
            "command": "make gpu-check" + (" (dry mode)" if check.dry else ""),
            "machine": {**machine, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")},
            "parts": bench.get("parts", {}), "execution": bench.get("execution"),
            "scaling": scaling.get("parts", {}).get("scaling"),
            "skipped": {**bench.get("skipped", {}), **scaling.get("skipped", {})},
            "failed": {**bench.get("failed", {}), **scaling.get("failed", {})},
            "config_only": {**bench.get("config_only", {}), **scaling.get("config_only", {})},
            "check": {o.name: {"status": o.status, "seconds": o.seconds, "summary": o.summary} for o in outcomes}}


def write_results(check: Check, machine: dict[str, Any], outcomes: list[Outcome], results_dir: Path,
                  markdown: Path) -> str:
    """The benchmark's result JSON, its curves and BENCHMARKS.md; what was written, in words."""
    from ddp_seq.bench import regenerate
    from ddp_seq.bench.report import plot_curves, render_markdown

    result = benchmark_result(check, machine, outcomes)
    if result is None:
        return "no benchmark figures"
    path = results_dir / f"{machine['date']}-{slug(machine['device'])}{'-dry' if check.dry else ''}.json"
    results_dir.mkdir(parents=True, exist_ok=True)
    for name, part in result["parts"].items():
        png = plot_curves({"parts": {name: part}}, path.with_name(f"{path.stem}-{name}.png"))
        part["curves"] = png.name if png else None
    write_json(path, result)
    if check.dry:  # a dry result is never one BENCHMARKS.md shows: render it alone, beside it
        markdown.write_text(render_markdown([(result, path.name)]))
    else:
        regenerate(results_dir, markdown, redraw=False)
    return f"{path}, {markdown}"


# -- main ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="the folder for every part's log and files "
                        "(default runs/gpu-check/<date>-<time>)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole check's seconds (default 450)")
    parser.add_argument("--jobs", type=int, default=0, help="correctness parts side by side (default 3 with "
                        "CUDA, 1 in the dry mode)")
    parser.add_argument("--only", default="", help="comma-separated parts to run (env always runs)")
    parser.add_argument("--dry", action="store_true", help="the dry mode even with CUDA (CUDA hidden)")
    parser.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="a part's time cap")
    parser.add_argument("--fail", default="", help="comma-separated parts given a failing first step (tests)")
    parser.add_argument("--hang", default="", help="comma-separated parts given a hanging first step (tests)")
    parser.add_argument("--results-dir", type=Path, help="default bench/results (dry mode: the --out folder)")
    parser.add_argument("--markdown", type=Path, help="default BENCHMARKS.md (dry mode: in the --out folder)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag in ("only", "fail", "hang"):
        names = {n for n in getattr(args, flag).split(",") if n}
        if names - set(PART_NAMES):
            parser.error(f"--{flag}: unknown part(s) {sorted(names - set(PART_NAMES))}; parts: {', '.join(PART_NAMES)}")
        setattr(args, flag, names)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args.dir, args.dry, args.rest)
        return 0
    out = args.out or REPO / "runs" / "gpu-check" / time.strftime("%Y-%m-%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    caps = {name: float(s) for name, s in (c.split("=", 1) for c in args.cap)}
    check = Check(out.resolve(), args.dry, args.budget_s, args.fail, args.hang, caps,
                  env={"CUDA_VISIBLE_DEVICES": ""} if args.dry else {})  # --dry: CUDA hidden from the env part on
    check.say(f"gpu-check: every part's log and files in {check.out}; budget {args.budget_s:.0f}s")
    env = run_part(check, SPECS[0])
    check.cuda = bool(env.details.get("cuda")) and not args.dry
    check.dry = not check.cuda
    if check.dry:  # also where env failed on a GPU machine: every run then agrees on the CPU
        check.env["CUDA_VISIBLE_DEVICES"] = ""
    check.say("gpu-check: mode " + ("gpu" if check.cuda else "dry (no CUDA GPU: tiny sizes on the CPU, what needs "
                                    "CUDA skipped, results kept in the output folder)"))
    wanted = [s for s in SPECS[1:] if not args.only or s.name in args.only]
    jobs = args.jobs or (3 if check.cuda else 1)
    # The timing parts run alone, after the others -- except in the dry mode, which measures nothing.
    pooled = [s for s in wanted if not s.timing or check.dry]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = [env, *pool.map(lambda spec: run_part(check, spec), pooled)]
    outcomes += [run_part(check, spec) for spec in wanted if spec not in pooled]
    return finish(check, args, outcomes, env.details.get("machine"))


def finish(check: Check, args: argparse.Namespace, outcomes: list[Outcome], machine: dict[str, Any] | None) -> int:
    """Write summary.json and the benchmark results; print the last line; 1 if any part failed."""
    written = "no benchmark figures"
    if machine:
        results_dir = args.results_dir or (check.out if check.dry else REPO / "bench" / "results")
        markdown = args.markdown or (check.out / "BENCHMARKS.md" if check.dry else REPO / "BENCHMARKS.md")
        try:
            written = write_results(check, machine, outcomes, results_dir, markdown)
        except Exception as e:  # noqa: BLE001 -- the parts' lines are printed already; say what went wrong
            written = f"writing the results FAILED: {type(e).__name__}: {e}"
    counts = {status: sum(o.status == status for o in outcomes) for status in ("pass", "FAIL", "skipped")}
    seconds = time.monotonic() - check.start
    write_json(check.out / "summary.json", {"mode": "gpu" if check.cuda else "dry", "seconds": seconds,
                                             "budget_s": check.budget_s, "results": written,
                                             "parts": [asdict(o) for o in outcomes]})
    check.say(f"gpu-check: {counts['pass']} passed, {counts['FAIL']} failed, {counts['skipped']} skipped in "
              f"{seconds:.0f}s ({'gpu' if check.cuda else 'dry'} mode); results: {written}")
    return 1 if counts["FAIL"] or written.startswith("writing the results FAILED") else 0


if __name__ == "__main__":
    sys.exit(main())
