"""Fixtures: the tiny YAML config, the DDP worker runs shared by test_ddp and test_eval; the gpu marker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DDP_SCENARIOS, TESTS, TINY_YAML, DDPRuns, python, torchrun


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> DDPRuns:
    """Run the worker once under torchrun (2 gloo ranks) and once as a plain process (world size 1)."""
    base = tmp_path_factory.mktemp("ddp")
    spec = base / "spec.json"
    spec.write_text(json.dumps({"scenarios": [{"name": k, "overrides": v} for k, v in DDP_SCENARIOS.items()]}))
    worker = TESTS / "workers" / "ddp_worker.py"
    out = base / "out"
    double = torchrun(worker, spec, out).check()
    single = python(worker, spec, out).check()
    return DDPRuns(out, single, double)


# -- markers ------------------------------------------------------------------------------------

def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
