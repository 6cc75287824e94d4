"""The shipped launchers without Slurm: launch/torchrun.sh, and launch/multinode.sh as two "nodes"
(two torchrun agents meeting through c10d rendezvous on localhost)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
from helpers import REPO, TINY_YAML, child_env, kill_job, torchrun

from ddp_seq.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(tmp) -> str:
    path = tmp / "tiny.yaml"
    path.write_text(TINY_YAML, encoding="utf-8")
    return str(path)


def test_torchrun_sh_runs_two_ranks_and_passes_overrides(tmp_path):
    env = child_env(NPROC="2", PYTHON=sys.executable)
    proc = subprocess.run([str(REPO / "launch" / "torchrun.sh"), "--config", config(tmp_path),
                           f"logging.root={tmp_path}", "logging.name=sh", "training.epochs=1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "world size 2" in proc.stdout and "epoch 1/1" in proc.stdout, proc.stdout
    assert load_checkpoint(tmp_path / "sh" / "checkpoints" / "last.pt")["finished"]


def test_two_agents_with_c10d_rendezvous_train_like_one_agent_with_two_ranks(tmp_path):
    yaml_path, port = config(tmp_path), free_port()
    common = ["--config", yaml_path, f"logging.root={tmp_path}"]
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
    torchrun("train.py", *common, "logging.name=one").check()
    two_nodes = load_checkpoint(tmp_path / "nodes" / "checkpoints" / "last.pt")
    one_node = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")
    assert two_nodes["finished"] and two_nodes["step"] == one_node["step"]
    for name, tensor in one_node["model"].items():
        torch.testing.assert_close(two_nodes["model"][name], tensor, rtol=0, atol=1e-6)
