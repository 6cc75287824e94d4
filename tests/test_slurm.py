"""The shipped Slurm script on a real Slurm: ``launch/slurm/local-cluster.sh up`` brings one up here.

Jobs are submitted exactly as a user would (partition and time on the sbatch command line, the
script unedited) and followed with ``scontrol show job`` (``sbatch --wait`` polls with a back-off
of up to 32 s; there is no accounting, so no ``sacct``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY_YAML, child_env

from ddp_seq.builders import model_from_checkpoint
from ddp_seq.train.checkpoint import load_checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="no Slurm here (sbatch absent); `make slurm-up` installs and starts one")]

SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
PARTITION = os.environ.get("SLURM_LOCAL_PARTITION", "debug")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@pytest.fixture(scope="module")
def cluster() -> None:
    """The local cluster, started if it is not running (idempotent)."""
    if subprocess.run(["scontrol", "ping"], capture_output=True).returncode != 0:
        up = subprocess.run([str(REPO / "launch" / "slurm" / "local-cluster.sh"), "up"], capture_output=True,
                            text=True, timeout=300)
        assert up.returncode == 0, f"local-cluster.sh up failed:\n{up.stdout}\n{up.stderr}"


def job_fields(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def submit(tmp: Path, *train_args: str) -> tuple[str, Path]:
    """``sbatch`` the shipped script from the repository root; returns the job id and its log."""
    log = tmp / "slurm-%j.out"
    env = child_env(DDP_SEQ_PYTHON=sys.executable)
    proc = subprocess.run(["sbatch", "--parsable", f"--partition={PARTITION}", "--time=10", f"--output={log}",
                           str(SCRIPT), *train_args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    return job, tmp / f"slurm-{job}.out"


def wait(job: str, timeout: float = 240, *, on_pending=None) -> dict[str, str]:
    """Poll ``scontrol show job`` every second until the job ends; returns its fields."""
    deadline = time.monotonic() + timeout
    while True:
        fields = job_fields(job)
        if fields.get("JobState") in TERMINAL:
            return fields
        if fields.get("JobState") == "PENDING" and on_pending is not None:
            on_pending(fields)
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still {fields.get('JobState')} after {timeout}s: {fields}")
        time.sleep(1)


def config(tmp: Path) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(TINY_YAML, encoding="utf-8")
    return path


def test_sbatch_trains_on_two_ranks_and_completes(cluster, tmp_path):
    job, log = submit(tmp_path, "--config", str(config(tmp_path)), f"logging.root={tmp_path / 'runs'}",
                      "logging.name=slurm")
    fields = wait(job)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), text
    assert "world size 2" in text and f"job {job} (restart 0) on 1 node(s) x 2 rank(s)" in text, text
    model, cfg, state = model_from_checkpoint(tmp_path / "runs" / "slurm" / "checkpoints" / "best.pt")
    assert state["sampler"]["epoch"] >= 1 and cfg.logging.name == "slurm"
    assert sum(p.numel() for p in model.parameters()) > 0
    assert load_checkpoint(tmp_path / "runs" / "slurm" / "checkpoints" / "last.pt")["train_state"]["finished"]
    # the rendezvous id is the job id: the run directory remembers it (how a requeued job finds it)
    assert (tmp_path / "runs" / "slurm" / ".job").read_text().strip() == job


def test_a_failing_run_ends_the_job_failed(cluster, tmp_path):
    job, log = submit(tmp_path, "--config", str(config(tmp_path)), f"logging.root={tmp_path / 'runs'}",
                      "training.lrr=0.1")
    fields = wait(job)
    text = log.read_text()
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] != "0:0", (fields, text)
    assert text.count("ddp-seq: error: training.lrr: unknown key") == 1, text


def test_sigterm_checkpoints_requeues_and_the_job_resumes(cluster, tmp_path):
    """What ``--signal=B:TERM@120`` does before a time limit, triggered by hand: the batch script
    passes SIGTERM to the ranks, they checkpoint, the job is requeued and resumes."""
    root = tmp_path / "runs"
    job, log = submit(tmp_path, "--config", str(config(tmp_path)), f"logging.root={root}",
                      "data.num_train=3000", "checkpoint.every_steps=20", "checkpoint.signal_check_steps=2")
    deadline = time.monotonic() + 120
    while not list(root.glob("*/checkpoints/step-00000020.pt")):
        assert job_fields(job).get("JobState") in ("PENDING", "RUNNING"), log.read_text()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=TERM", "--batch", job], check=True)

    def start_now(fields: dict[str, str]) -> None:
        # Slurm holds a requeued job for about two minutes (Reason=BeginTime); release it once the
        # node has cleaned up after the first run (released earlier, the start fails with "Job
        # credential revoked").
        idle = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip()
        if int(fields.get("Restarts", "0")) > 0 and idle.startswith("idle"):
            time.sleep(2)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)

    fields = wait(job, on_pending=start_now)
    text = log.read_text()
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "SIGTERM: stopped at epoch 1" in text and f"job {job} (restart 1)" in text, text
    runs = [p for p in root.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs  # the requeued job found its run directory by the job id
    stopped = int(re.search(r"SIGTERM: stopped at epoch 1, step (\d+)", text).group(1))
    assert f"step {stopped}, saved with world size 2" in text, text  # resumed from the SIGTERM checkpoint
    assert load_checkpoint(runs[0] / "checkpoints" / "last.pt")["train_state"]["finished"]
