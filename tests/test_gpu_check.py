"""``make gpu-check`` (launch/gpu_check.py, issue 28): its dry mode, run as a whole on this CPU
machine, and its pieces -- the GPU suite and its targets in BENCHMARKS.md, the salvage of a
benchmark cut at its cap, the budget, the parsers -- without a GPU.

The dry mode is what a machine without CUDA runs: the same harness at tiny sizes on the CPU, the
parts that need CUDA skipped and said so, the results kept in its output folder. A failing and a
hanging part are injected to show that each costs its own part and nothing else.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, Proc, python

from ddp_seq.bench.report import newest_per_device, other_path, render_markdown, targets
from ddp_seq.bench.suite import CLASSIFY_BASE, LARGE, SUITES, default_variant, finish_parts, scaling_part
from ddp_seq.config import load_config

SCRIPT = REPO / "launch" / "gpu_check.py"
#: One part's line: ``gpu-check NAME STATUS SECONDSs FIGURES``.
LINE = re.compile(r"^gpu-check (\S+) +(pass|FAIL|skipped) +(\d+\.\d)s  (.*)$")


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gc = _load_script()


def part_lines(proc: Proc) -> dict[str, tuple[str, str]]:
    """``{part: (status, figures)}`` from the check's output, asserting one line per part."""
    found = [LINE.match(line) for line in proc.stdout.splitlines()]
    names = [m.group(1) for m in found if m]
    assert len(names) == len(set(names)), proc.report()
    return {m.group(1): (m.group(2), m.group(4)) for m in found if m}


def digest(*paths: Path) -> dict[str, str]:
    """A fingerprint of files and folders (to show the dry mode leaves them alone)."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


# -- the dry mode, run once -------------------------------------------------------------------------

#: The one part given a hanging step in the dry run: parity (tests/test_parity.py runs its command
#: already), cut at 3 s, before the two timing parts, which must still run.
HUNG = "parity"


@pytest.fixture(scope="module")
def dry(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    before = digest(REPO / "bench" / "results", REPO / "BENCHMARKS.md")
    start = time.monotonic()
    # --jobs 2: the parts two at a time (most are one single-threaded process, which would leave the
    # second core idle); the dry mode measures nothing, so its timing parts join them
    proc = python(SCRIPT, "--dry", "--jobs", "2", "--out", out, "--hang", HUNG, "--cap", f"{HUNG}=3", timeout=300)
    seconds = time.monotonic() - start
    return proc, out, before, seconds


@pytest.mark.slow
def test_dry_mode_runs_every_part_it_can_and_says_what_it_skipped(dry):
    proc, out, _, seconds = dry
    assert proc.returncode == 1, proc.report()  # the hung part failed
    lines = part_lines(proc)
    assert sorted(lines) == sorted(gc.PART_NAMES), proc.report()  # one line each, as each part finishes
    status = {name: s for name, (s, _) in lines.items()}
    assert status == {**dict.fromkeys(gc.PART_NAMES, "pass"), "gpu-tests": "skipped", HUNG: "FAIL"}, proc.report()
    assert lines["gpu-tests"][1] == "needs CUDA (the gpu-marked tests skip without it)"
    assert "no CUDA GPU: dry mode" in lines["env"][1] and "tracking off" in lines["env"][1]
    # The smoke matrix: 32 runs, of which the 8 fp16 ones need CUDA.
    smoke, cli = lines["smoke"][1], lines["cli"][1]
    assert smoke.startswith("24/24 runs trained on cpu") and "skipped 8 (fp16 needs CUDA)" in smoke
    assert "amp=auto -> " in smoke and "amp=auto -> ?" not in smoke
    assert "train on cpu" in cli and "predict 64 rows" in cli and "export onnx" in cli
    assert lines["resume"][1].startswith("cpu -> cpu -> cpu: epochs 1, 2, 3 each once")
    assert lines["bench"][1].startswith("classify: ddp bucket+padded ") and "x reference" in lines["bench"][1]
    assert lines["scaling"][1].endswith("4, 8 ranks skipped (dry mode: 2 cores)")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu-check: 7 passed, 1 failed, 1 skipped in ") and "(dry mode)" in last
    assert seconds < 200, f"the dry mode took {seconds:.0f}s"  # ~45 s on 2 idle cores
    for name in gc.PART_NAMES:  # every part that ran has its full log
        assert name == "gpu-tests" or (out / f"{name}.log").stat().st_size > 0, name


@pytest.mark.slow
def test_a_hanging_part_is_cut_at_its_cap_with_its_processes_and_the_others_run_on(dry):
    proc, out, _, _ = dry
    status, figures = part_lines(proc)[HUNG]
    seconds = float(LINE.match(next(line for line in proc.stdout.splitlines() if line.startswith(
        f"gpu-check {HUNG} "))).group(3))
    assert status == "FAIL" and figures.startswith("injected hang: killed at the part's time cap (3s)")
    assert 3.0 <= seconds < 8.0
    # The hanging step's child, in a session of its own as torchrun's workers are, was killed too.
    child = int(re.search(r"hanging; child pid (\d+)", (out / f"{HUNG}.log").read_text()).group(1))
    assert not _alive(child)
    # Its real step never started; the timing parts after it ran (test above: both pass).
    assert "ddp_seq parity" not in (out / f"{HUNG}.log").read_text()


@pytest.mark.slow
def test_dry_mode_writes_its_results_beside_it_and_leaves_the_repositorys_alone(dry):
    proc, out, before, _ = dry
    assert digest(REPO / "bench" / "results", REPO / "BENCHMARKS.md") == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dry" and [p["name"] for p in summary["parts"]] == list(gc.PART_NAMES)
    lines = part_lines(proc)
    assert {p["name"]: p["status"] for p in summary["parts"]} == {k: v[0] for k, v in lines.items()}
    [path] = out.glob("*-cpu-dry.json")
    result = json.loads(path.read_text())
    assert result["suite"] == "gpu-check" and result["quick"] and result["complete"]
    assert result["machine"]["device"] == "cpu" and result["failed"] == {}
    # The dry mode's bench: the default workload's reference and default row as --quick; the other
    # parts' rows have their configs checked. CPU scaling on 1 and 2 ranks.
    assert set(result["parts"]) == {"classify"}
    assert set(result["parts"]["classify"]["variants"]) == {"reference", "ddp bucket+padded"}
    for row in ("large: ddp bucket+packed, bf16", "short: reference", "classify: ddp random+packed"):
        assert "config checked, not run" in result["config_only"][row], row
    assert set(result["scaling"]["variants"]) == {"1 gloo rank", "2 gloo ranks"}
    assert result["scaling"]["variants"]["2 gloo ranks"]["step_ms"] > 0  # the step-time breakdown
    assert result["execution"]["device"] == "cpu" and len(result["execution"]["variants"]) == 8
    assert {name: part["status"] for name, part in result["check"].items()} == {k: v[0] for k, v in lines.items()}
    markdown = (out / "BENCHMARKS.md").read_text()
    assert "## CPU (2 cores) (`make gpu-check`)" in markdown and "### classify" in markdown
    assert "## CPU scaling on" in markdown and "| 2 gloo ranks |" in markdown
    assert newest_per_device(out) == []  # a dry result is never shown in BENCHMARKS.md


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_make_gpu_check_runs_the_script_with_plain_python3_where_there_is_no_venv(tmp_path):
    # The GPU machine has no .venv and nothing installed: the target must not depend on the install step.
    # Not as a sub-make of `make test`: the parent's MAKEFLAGS would make it print directories.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}

    def make_n(*args: str) -> list[str]:
        out = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True).stdout
        return [line.strip() for line in out.splitlines() if line.strip()]

    assert make_n(f"VENV={tmp_path / 'none'}") == ["PYTHONPATH=. python3 launch/gpu_check.py"]
    here = " ".join(make_n("GPU_CHECK_ARGS=--dry"))
    if (REPO / ".venv" / "bin" / "python").exists():
        assert here == "PYTHONPATH=. .venv/bin/python launch/gpu_check.py --dry"


# -- pieces, in this process ------------------------------------------------------------------------

def test_a_part_is_not_started_without_time_left_and_a_part_never_outlives_the_budget(tmp_path, capsys):
    check = gc.Check(tmp_path, True, 100.0, set(), set(), {})
    part = gc.Part(check, gc.Spec("bench", 1000.0, timing=True))
    assert part.deadline <= check.deadline == check.start + 100.0 - gc.RESERVE_S
    check.start -= 95.0  # 5 s of the budget left
    outcome = gc.run_part(check, gc.Spec("dp", 60.0))
    assert (outcome.status, outcome.summary) == ("skipped", "no time left in the 100s budget")
    assert capsys.readouterr().out.startswith("gpu-check dp        skipped    0.0s  no time left")
    # The caps fit the 8 minutes the issue allows, with the correctness parts side by side.
    correctness = max(s.cap_s for s in gc.SPECS if not s.timing)
    assert correctness + sum(s.cap_s for s in gc.SPECS if s.timing) <= 8 * 60


def test_a_failing_part_is_reported_and_its_own_work_never_starts(tmp_path, capsys):
    check = gc.Check(tmp_path, True, 100.0, {"dp"}, set(), {})
    outcome = gc.run_part(check, gc.Spec("dp", 30.0))
    assert (outcome.status, outcome.summary) == ("FAIL", "injected failure: exit 3: injected failure")
    assert capsys.readouterr().out.startswith("gpu-check dp        FAIL   ")
    assert not (tmp_path / "dp" / "runs").exists()  # the part stopped at its failed step
    assert "injected failure" in (tmp_path / "dp.log").read_text()  # its log has the step and its output


def test_the_parity_and_gpu_tests_parts_read_their_commands_output(tmp_path, monkeypatch):
    outputs = {"ddp-seq parity": "table...\nparity: OK, every mode within the tolerance in all 16 configurations\n",
               "pytest -m gpu": "....s\nSKIPPED [1] tests/test_dataparallel.py:210: needs 2 GPUs\n"
                                "11 passed, 1 skipped, 140 deselected in 9.10s\n"}
    monkeypatch.setattr(gc.Part, "python", lambda self, label, *args, **kwargs: outputs[label])
    check = gc.Check(tmp_path, False, 100.0, set(), set(), {}, cuda=True)
    assert gc.part_parity(gc.Part(check, gc.Spec("parity", 30.0)))[0].startswith("parity: OK")
    summary, details = gc.part_gpu_tests(gc.Part(check, gc.Spec("gpu-tests", 30.0)))
    assert summary.startswith("11 passed, 1 skipped") and details["counts"]["passed"] == 11
    assert {"tests/test_amp.py", "tests/test_collate.py", "tests/test_dataparallel.py"} <= set(details["files"])
    outputs["pytest -m gpu"] = "12 skipped, 140 deselected in 3.0s\n"  # CUDA invisible to pytest: not a pass
    with pytest.raises(gc.PartFailed, match="no gpu-marked test passed"):
        gc.part_gpu_tests(gc.Part(check, gc.Spec("gpu-tests", 30.0)))
    with pytest.raises(gc.PartSkipped, match="needs CUDA"):
        gc.part_gpu_tests(gc.Part(gc.Check(tmp_path, True, 100.0, set(), set(), {}), gc.Spec("gpu-tests", 30.0)))


def test_the_smoke_matrix_and_the_parsers():
    runs = gc.smoke_runs()
    assert len(runs) == 32 and len({name for name, _ in runs}) == 32
    assert ("gru bi padded fp16", ["model.cell=gru", "model.bidirectional=true", "model.execution=padded",
                                   "training.amp=fp16"]) in runs
    for _, overrides in runs:
        load_config(gc.CONFIG, [*gc.GPU_SMOKE, *overrides])  # every run's config is valid
    text = "....\nSKIPPED [1] tests/test_x.py:3: needs 2 GPUs\n11 passed, 1 skipped, 1302 deselected in 9.1s\n"
    assert gc.pytest_counts(text) == {"passed": 11, "skipped": 1, "deselected": 1302}
    assert gc.pytest_counts("2 failed, 9 passed in 3s") == {"failed": 2, "passed": 9}
    assert gc.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    log = "training classify on 9 sequences (9 steps), mode ddp, world size 1, device cuda:0, 16 thread(s)"
    assert gc.device_of(log) == "cuda:0"
    with pytest.raises(gc.PartFailed, match="expected cuda"):
        gc.expect_device("world size 1, device cpu, 1 thread", True, "train")


def test_the_gpu_suite_and_cpu_scaling_rows():
    gpu = SUITES["gpu"]
    assert list(gpu) == ["classify", "large", "short"]  # the most wanted figures first
    assert {v.name for v in gpu["classify"].variants} == {
        "reference", *(f"ddp {s}+{e}" for s in ("random", "bucket") for e in ("packed", "padded"))}
    assert {v.name for v in gpu["large"].variants} == {
        f"ddp bucket+{e}{b}" for e in ("packed", "padded") for b in ("", ", bf16")}
    assert all(v.world_size == 0 for v in gpu["large"].variants)  # one rank per GPU: one process on one GPU
    large = load_config("configs/default.yaml", list(gpu["large"].base))
    assert (large.model.hidden, large.model.layers, large.training.epochs) == (1024, 3, 3)
    assert gpu["large"].base == (*CLASSIFY_BASE, *LARGE)
    short = load_config("configs/default.yaml", list(gpu["short"].base))
    assert (short.data.num_train, short.data.length_median, short.training.epochs) == (28800, 8.0, 1)
    part = scaling_part((1, 2, 4, 8))
    assert [(v.name, v.world_size) for v in part.variants] == [
        ("1 gloo rank", 1), ("2 gloo ranks", 2), ("4 gloo ranks", 4), ("8 gloo ranks", 8)]
    assert part.baseline == "1 gloo rank" and SUITES["scaling"]["scaling"] == part
    assert all("distributed.backend=gloo" in v.overrides for v in part.variants)


def _row(tps: float, metric: float, seconds: float = 10.0, **extra) -> dict:
    return {"tokens_per_s": tps, "final_metric": metric, "metric_at_budget": metric, "curve": [(seconds, metric)],
            "vs_baseline": 1.0, "seq_per_s": 1.0, "epoch_s": 1.0, "padding_efficiency": 0.9, "straggler_ratio": 1.0,
            "peak_rss_mb": [100.0], "step_ms": 5.0, "data_ms": 0.1, "forward_ms": 2.0, "backward_ms": 2.0,
            "sync_ms": 0.0, "optimizer_ms": 0.5, "other_ms": 0.4, "sync_share": 0.0, **extra}


def _gpu_result(bf16_metric: float = 0.99) -> dict:
    def part(rows, baseline, default, base=CLASSIFY_BASE):
        return {"base_overrides": list(base), "monitor": "val_accuracy", "budget_s": 10.0, "baseline": baseline,
                "default": default, "variants": rows}

    machine = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-06", "finished": "2026-12-06T10:00:00",
               "host": "gpu", "cores": 16, "torch": "2.11.0+cu130", "python": "3.12.3"}
    classify = part({"reference": _row(4000.0, 0.95), "ddp bucket+packed": _row(48000.0, 0.99),
                     "ddp bucket+padded": _row(40000.0, 0.99), "ddp random+packed": _row(20000.0, 0.98)},
                    "reference", "ddp bucket+packed")
    large = part({"ddp bucket+packed": _row(10000.0, 0.99), "ddp bucket+padded": _row(11000.0, 0.99),
                  "ddp bucket+packed, bf16": _row(14000.0, bf16_metric)}, "ddp bucket+packed", "ddp bucket+packed",
                 (*CLASSIFY_BASE, *LARGE))
    eight = _row(150000.0, 0.98, vs_baseline=2.5, sync_share=0.2)
    scaling = part({"1 gloo rank": _row(60000.0, 0.98), "8 gloo ranks": eight}, "1 gloo rank", "1 gloo rank")
    return {"suite": "gpu-check", "complete": True, "quick": False, "repeats": 1, "config": "configs/default.yaml",
            "command": "make gpu-check", "machine": machine, "parts": {"classify": classify, "large": large},
            "scaling": scaling, "skipped": {}}


def test_gpu_targets_are_checked_against_the_measured_ratios():
    checks = {row["target"]: row for row in targets(_gpu_result())}
    assert checks["default config >= 10x reference tokens/s"]["met"] == "yes"  # 12x, the single-GPU target
    assert checks["classify: execution=auto's choice (ddp bucket+packed) >= the other path"]["met"] == "yes"  # 1.2x
    assert checks["large: execution=auto's choice (ddp bucket+packed) >= the other path"]["met"] == "NO"  # 0.91x
    bf16 = checks["large: bf16 >= 1.3x fp32 tokens/s"]
    assert bf16["met"] == "yes" and bf16["measured"].startswith("1.40x")
    assert checks["... at equal val_accuracy after the fixed epochs (bf16 within 0.005 of fp32)"]["met"] == "yes"
    worse = {row["target"]: row["met"] for row in targets(_gpu_result(bf16_metric=0.97))}
    assert worse["... at equal val_accuracy after the fixed epochs (bf16 within 0.005 of fp32)"] == "NO"
    cpu = {**_gpu_result(), "suite": "default"}  # make bench's results keep their own targets only
    assert not any(row["target"].startswith("large:") for row in targets(cpu))


def test_benchmarks_md_gets_a_gpu_section_and_a_scaling_section(tmp_path):
    cpu = json.loads((REPO / "bench" / "results" / "2026-11-30-vm.json").read_text())
    (tmp_path / "2026-11-30-vm.json").write_text(json.dumps(cpu))
    (tmp_path / "2026-12-06-nvidia-h100-80gb-hbm3.json").write_text(json.dumps(_gpu_result()))
    chosen = newest_per_device(tmp_path)
    assert [name for _, name in chosen] == ["2026-11-30-vm.json", "2026-12-06-nvidia-h100-80gb-hbm3.json"]
    text = render_markdown(chosen)
    cpu_at, gpu_at = text.index("## CPU (2 cores)"), text.index("## NVIDIA H100 80GB HBM3 (`make gpu-check`)")
    scaling_at = text.index("## CPU scaling on 16 cores (gloo, 2026-12-06, `gpu`)")
    assert cpu_at < gpu_at < scaling_at
    gpu = text[gpu_at:scaling_at]
    assert "### classify" in gpu and "### large" in gpu and "| ddp bucket+packed, bf16 | 14,000 |" in gpu
    assert "#### large: where a step's time goes" in gpu
    assert "| large: bf16 >= 1.3x fp32 tokens/s |" in gpu
    scaling = text[scaling_at:]
    assert "| 8 gloo ranks | 150,000 | 2.500 |" in scaling and "#### scaling: where a step's time goes" in scaling


def test_a_benchmark_cut_at_its_cap_keeps_its_finished_rows(tmp_path):
    from ddp_seq.bench import summarise

    def epoch(tps: float) -> dict:
        return {"kind": "epoch", "train_s": 2.0, "tokens_per_s": tps, "seq_per_s": 10.0, "padding_efficiency": 0.9,
                "straggler_ratio": 1.0, "val_accuracy": 0.9, "peak_rss_mb": [100.0]}

    # Killed during its third row: the reference and this machine's default row had finished.
    parts = SUITES["gpu"]
    default = default_variant(parts["classify"])  # padded on a CPU, packed on CUDA
    runs = {"classify": {"reference": [summarise([epoch(100.0)], "val_accuracy")],
                         default: [summarise([epoch(1200.0)], "val_accuracy")], other_path(default): []},
            "large": {"ddp bucket+packed": []}, "short": {}}
    overrides = {name: list(part.base) for name, part in parts.items()}
    partial = {"suite": "gpu", "complete": False, "runs": runs, "base_overrides": overrides,
               "monitors": dict.fromkeys(parts, "val_accuracy"), "skipped": {}}
    (tmp_path / "bench.partial.json").write_text(json.dumps(partial))
    kept = gc.salvage(tmp_path / "bench.partial.json", "bench")
    assert set(kept["parts"]) == {"classify"} and not kept["complete"]
    assert set(kept["parts"]["classify"]["variants"]) == {"reference", default}
    assert kept["parts"]["classify"]["variants"][default]["vs_baseline"] == pytest.approx(12.0)
    assert finish_parts(parts, {}, overrides, {}) == {}
    assert gc.salvage(tmp_path / "missing.json", "bench") is None
    text = gc.bench_figures(kept)
    assert text == f"classify: {default} 1,200 tok/s, 12.00x reference (2 rows, 0 skipped)"  # no breakdown: none
