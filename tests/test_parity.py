"""The parity check (``ddp-seq parity``): it passes, and it fails when the modes really differ.

In one process: ``single`` against ``dp`` (DataParallel's split on one device), and the check's
sensitivity -- a mean of per-rank means and a batch whose targets were not sorted with its inputs
are computed here with the real model and data, and must exceed the tolerance by far. The slow
tests run the real command: through torchrun (passes), and with its test-only fault switch
(fails, exit code != 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import python, torchrun

from ddp_seq.cli import parity
from ddp_seq.data.collate import collate, collate_dp, fetch
from ddp_seq.data.sampler import Share, split_shares
from ddp_seq.parallel.process_group import DistInfo
from ddp_seq.train import objective

CPU_ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)

#: A few of parity.CASES (the command runs all 16): both tasks, both cells, both directions and paths.
SOME = [("classify", "lstm", False, "packed"), ("classify", "gru", True, "padded"),
        ("tag", "gru", False, "packed"), ("tag", "lstm", True, "padded")]


def fake(loss: float, **grads: list[float]) -> parity.Result:
    return parity.Result(loss, {k: torch.tensor(v, dtype=torch.float64) for k, v in grads.items()})


def test_compare_accepts_rounding_and_flags_anything_larger():
    ref = fake(1.0, w=[0.1, -0.2], b=[0.05])
    assert parity.compare("c", "dp", ref, ref).ok
    near = fake(1.0 + 0.5 * parity.LOSS_ATOL, w=[0.1 + 0.5 * parity.GRAD_ATOL, -0.2], b=[0.05])
    row = parity.compare("c", "dp", ref, near)
    assert row.ok and row.grad_diff == pytest.approx(0.5 * parity.GRAD_ATOL)
    assert not parity.compare("c", "dp", ref, fake(1.0, w=[0.1, -0.2], b=[0.05 + 2 * parity.GRAD_ATOL])).ok
    assert not parity.compare("c", "dp", ref, fake(1.0 + 2 * parity.LOSS_ATOL, w=[0.1, -0.2], b=[0.05])).ok
    table = parity.render([parity.compare("c", "single", ref, ref), parity.compare("c", "ddp x2", ref, near),
                           parity.compare("c", "dp", ref, fake(1.0, w=[0.2, -0.2], b=[0.05]))])
    lines = table.splitlines()
    assert lines[0].split() == ["config", "mode", "loss", "|loss", "-", "single|", "max", "|grad", "-", "single|", "ok"]
    assert lines[2].endswith(" ok") and lines[3].endswith("FAIL") and "1.0e-01" in lines[3]


@pytest.mark.parametrize("case", SOME, ids=[parity.case_name(*c) for c in SOME])
def test_single_and_dp_agree_in_one_process(case):
    single, batch, lengths = parity.single_result(parity.case_config(*case, "single"), CPU_ONE)
    dp, how = parity.dp_result(parity.case_config(*case, "dp"), CPU_ONE)
    if torch.cuda.device_count() < 2:
        assert "split into 2 chunks" in how
    row = parity.compare(parity.case_name(*case), "dp", single, dp)
    assert row.ok, row
    assert max(float(g.abs().max()) for g in single.grads.values()) > 1e-3  # a real gradient, not ~0
    assert list(batch) != sorted(batch, key=lambda i: -lengths[i])  # single sees the batch unsorted


def mean_of_rank_means(case, world_size: int = 2) -> tuple[parity.Result, parity.Result]:
    """The single reference, and the gradient DDP would produce if each rank divided by its own count."""
    single, batch, lengths = parity.single_result(parity.case_config(*case, "single"), CPU_ONE)
    trainer = parity._trainer(parity.case_config(*case, "single"), CPU_ONE)
    shares = split_shares(batch, lengths, world_size)
    sizes = [len(s) if case[0] == "classify" else int(lengths[s].sum()) for s in shares]
    assert len(set(sizes)) == world_size, "precondition: the shares differ in size"
    loss = 0.0
    for share in shares:
        b = collate(fetch(trainer.train_data, Share(share, True, len(share), int(lengths[share].sum()))))
        loss = loss + objective.loss_sum(case[0], trainer.module(b.inputs, b.lengths), b) / \
            objective.global_count(case[0], b)
    loss = loss / world_size
    grads = torch.autograd.grad(loss, list(trainer.module.parameters()))
    names = [n for n, _ in trainer.module.named_parameters()]
    return single, parity.Result(float(loss.detach()), {n: g.double() for n, g in zip(names, grads)})


@pytest.mark.parametrize("case", SOME, ids=[parity.case_name(*c) for c in SOME])
def test_a_mean_of_per_rank_means_fails_the_check(case):
    single, wrong = mean_of_rank_means(case)
    row = parity.compare(parity.case_name(*case), "ddp x2", single, wrong)
    assert not row.ok and row.grad_diff > 1000 * parity.GRAD_ATOL, row


@pytest.mark.parametrize("case", SOME, ids=[parity.case_name(*c) for c in SOME])
def test_targets_not_sorted_with_the_inputs_fail_the_check(case):
    """collate_dp sorts inputs, lengths and targets together; a version that sorted the inputs and
    left the targets in the drawn order (never unsorting) would pair outputs with other labels."""
    single, batch, lengths = parity.single_result(parity.case_config(*case, "single"), CPU_ONE)
    trainer = parity._trainer(parity.case_config(*case, "dp"), CPU_ONE)
    step = Share(np.asarray(batch), True, len(batch), int(lengths[batch].sum()))
    broken = collate_dp(fetch(trainer.train_data, step))
    broken.targets = collate(fetch(trainer.train_data, step)).targets  # drawn order
    row = parity.compare(parity.case_name(*case), "dp", single, parity.step_result(trainer, broken))
    assert not row.ok and row.grad_diff > 100 * parity.GRAD_ATOL, row


def test_parity_refuses_a_single_process_world(monkeypatch, capsys):
    """In this process: the refusal comes before any process group (``python -m ddp_seq parity``
    itself is run by the slow test that relaunches under torchrun)."""
    from ddp_seq.cli import main

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert main(["parity"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [
        "ddp-seq: error: parity: the ddp rows need at least 2 processes; run it under torchrun "
        "--nproc_per_node=2 (or without torchrun: it starts torchrun itself)"]


def parse(stdout: str) -> list[list[str]]:
    """The table's rows as cells (configs have 4 words)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["config", "mode"])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        words = line.split()
        rows.append([" ".join(words[:4]), *words[4:]])
    return rows


@pytest.mark.slow
def test_parity_command_passes_under_torchrun():
    proc = torchrun("-m", "ddp_seq", "parity", nproc=2, timeout=240).check()
    rows = parse(proc.stdout)
    assert len(rows) == 3 * len(parity.CASES) == 48
    assert {r[0] for r in rows} == {parity.case_name(*c) for c in parity.CASES}
    assert [r[1] for r in rows[:3]] == ["single", "dp", "ddp"] and rows[2][2] == "x2"
    for row in rows:
        if row[1] != "single":
            assert row[-1] == "ok", row
            assert float(row[-2]) <= parity.GRAD_ATOL and float(row[-3]) <= parity.LOSS_ATOL
    assert "ddp: 2 processes (gloo)" in proc.stdout or "(nccl)" in proc.stdout
    assert "parity: OK" in proc.stdout


@pytest.mark.slow
def test_parity_command_fails_when_ddp_uses_a_mean_of_per_rank_means():
    """Started without torchrun (the command launches it); the test-only switch breaks the ddp rows."""
    proc = python("-m", "ddp_seq", "parity", timeout=240, **{parity.FAULT_ENV: "mean-of-rank-means"})
    assert proc.returncode != 0, proc.report()
    rows = parse(proc.stdout)
    assert len(rows) == 48
    assert all(r[-1] == "FAIL" for r in rows if r[1] == "ddp") and all(r[-1] == "ok" for r in rows if r[1] == "dp")
    assert f"parity: FAILED, {len(parity.CASES)} of 48 rows exceed the tolerance" in proc.stdout
