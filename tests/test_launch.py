"""The shipped launchers without Slurm: launch/torchrun.sh, and launch/multinode.sh as two "nodes"
(two torchrun agents meeting through c10d rendezvous on localhost)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from helpers import REPO, TINY_YAML, child_env, kill_job

from ddp_seq.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp) -> str:
    path = tmp / "tiny.yaml"
    path.write_text(TINY_YAML, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sh_run(tmp_path_factory):
    """launch/torchrun.sh with NPROC=2: one agent with two ranks, 1 epoch. Its test checks the launcher;
    the two-agent test compares its weights against this run (the one-agent reference)."""
    tmp = tmp_path_factory.mktemp("sh")
    env = child_env(NPROC="2", PYTHON=sys.executable)
    proc = subprocess.run([str(REPO / "launch" / "torchrun.sh"), "--config", config(tmp),
                           f"logging.root={tmp}", "logging.name=sh", "training.epochs=1"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=180)
    return proc, tmp / "sh"


def test_torchrun_sh_runs_two_ranks_and_passes_overrides(sh_run):
    proc, run = sh_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world size 2" in proc.stdout and "epoch 1/1" in proc.stdout, proc.stdout
    assert load_checkpoint(run / "checkpoints" / "last.pt")["train_state"]["finished"]


def test_two_agents_with_c10d_rendezvous_train_like_one_agent_with_two_ranks(sh_run, tmp_path):
    yaml_path, port = config(tmp_path), free_port()
    # The same config as sh_run (TINY_YAML, 1 epoch): that one-agent two-rank run is the reference.
    common = ["--config", yaml_path, f"logging.root={tmp_path}", "training.epochs=1"]
    agents = []
    try:
        for node_rank in (0, 1):
            env = child_env(NNODES="2", NODE_RANK=str(node_rank), HEAD="127.0.0.1", PORT=str(port), NPROC="1",
                            RDZV_ID="two-nodes", PYTHON=sys.executable)
            agents.append(subprocess.Popen([str(REPO / "launch" / "multinode.sh"), *common, "logging.name=nodes"],
                                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, start_new_session=True))
        outputs = [agent.communicate(timeout=180)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_job(agent)
    for agent, out in zip(agents, outputs):
        assert agent.returncode == 0, out
    assert sum("world size 2" in out for out in outputs) == 1, outputs  # printed by global rank 0 only
    sh_proc, sh_dir = sh_run
    assert sh_proc.returncode == 0, sh_proc.stdout + sh_proc.stderr
    two_nodes = load_checkpoint(tmp_path / "nodes" / "checkpoints" / "last.pt")
    one_node = load_checkpoint(sh_dir / "checkpoints" / "last.pt")
    assert two_nodes["train_state"]["finished"]
    assert two_nodes["train_state"]["step"] == one_node["train_state"]["step"]
    for name, tensor in one_node["model"].items():
        torch.testing.assert_close(two_nodes["model"][name], tensor, rtol=0, atol=1e-6)
