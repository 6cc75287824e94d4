"""training.mode: ddp, dp (legacy nn.DataParallel) and single share one trainer.

dp is one process with the whole global batch: on a machine without GPUs nn.DataParallel only
calls the module, and a run must give the same steps as ddp on 2 ranks (the same global batches,
the same ``sum / N`` loss); its checkpoints hold the unwrapped module, so they resume under ddp
and back. The split across GPUs itself is tested in test_dataparallel.py and by the parity check.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Proc, python, ragged, torchrun

from ddp_seq.cli import main
from ddp_seq.config import ConfigError, check_mode, load_config
from ddp_seq.data.collate import collate, collate_dp, collate_for, fetch
from ddp_seq.data.sampler import Share
from ddp_seq.errors import UserError
from ddp_seq.loggers.runlog import NullLogger
from ddp_seq.nn.seq_model import SeqModel
from ddp_seq.parallel.process_group import DistInfo
from ddp_seq.parallel.wrap import SplitReplicas, wrap_model
from ddp_seq.train.checkpoint import load_checkpoint
from ddp_seq.train.resume import step_path

CPU_ONE = DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"), backend=None)

TINY = ["data.num_train=96", "data.num_val=24", "data.max_length=30", "model.hidden=8", "model.embedding_dim=8",
        "model.layers=1", "batching.batch_size=16", "training.warmup_steps=0", "logging.progress=none"]


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# -- config and refusals --------------------------------------------------------------------------

def test_mode_defaults_to_ddp_and_is_validated():
    assert load_config().training.mode == "ddp"
    assert load_config(overrides=["training.mode=dp"]).training.mode == "dp"
    with pytest.raises(ConfigError, match=r"^training\.mode: must be one of ddp, dp, single; got 'dpp'$"):
        load_config(overrides=["training.mode=dpp"])


@pytest.mark.parametrize("mode", ["dp", "single"])
def test_one_process_modes_refuse_a_multi_process_job(mode):
    check_mode(mode, 1)
    check_mode("ddp", 4)
    with pytest.raises(UserError) as err:
        check_mode(mode, 2)
    message = str(err.value)
    assert message.startswith(f"training.mode: {mode} runs in one process") and "python train.py" in message
    assert "\n" not in message


def test_dp_in_a_torchrun_environment_exits_2_before_joining_a_group(tmp_path):
    """What each torchrun worker sees (WORLD_SIZE=2); no MASTER_ADDR is set, so joining a process
    group would fail differently: the refusal comes first, before torch is imported. Only rank 0 prints.

    Ranks 0 and 1 run at the same time, as under torchrun: rank 1 waits ``PEER_ERROR_GRACE_S`` (2 s)
    before it exits, and rank 0 runs meanwhile instead of after it. They never talk to each other."""
    roots = {rank: tmp_path / f"rank{rank}" for rank in ("0", "1")}

    def refused(rank: str) -> Proc:
        roots[rank].mkdir()
        return python("train.py", *TINY, "training.mode=dp", f"logging.root={roots[rank]}", timeout=60,
                      WORLD_SIZE="2", RANK=rank, LOCAL_RANK=rank, LOCAL_WORLD_SIZE="2")

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(roots, pool.map(refused, roots)))
    for rank, proc in procs.items():
        proc.check(2)
        lines = proc.stderr.strip().splitlines()
        if rank == "0":
            assert len(lines) == 1 and lines[0].startswith("ddp-seq: error: training.mode: dp runs in one process")
        else:
            assert lines == [], proc.report()
        root = roots[rank]
        assert not root.joinpath("classify").exists() and list(root.iterdir()) == []  # no run directory


# -- the dp data path -----------------------------------------------------------------------------

@pytest.mark.parametrize("per_step", [False, True], ids=["per-sequence", "per-step"])
def test_collate_dp_sorts_longest_first_and_its_lengths_travel(per_step):
    data = ragged([4, 9, 2, 7, 7, 1], 3, per_step=per_step)
    step = Share(np.array([0, 1, 2, 3, 4, 5]), True, 6, 30)
    plain, dp = collate(fetch(data, step)), collate_dp(fetch(data, step))
    assert dp.lengths.tolist() == [9, 7, 7, 4, 2, 1] and dp.indices.tolist() == [1, 3, 4, 0, 2, 5]  # stable
    order = dp.indices.tolist()  # every field is sorted together: nothing has to be unsorted later
    for name in ("inputs", "targets", "mask", "weights"):
        assert torch.equal(getattr(dp, name), getattr(plain, name)[order]), name
    assert (dp.global_count, dp.global_tokens) == (6, 30) and dp.real_tokens == plain.real_tokens == 30
    assert plain.scatter_lengths is None and plain.model_lengths is plain.lengths
    assert dp.scatter_lengths.dtype == torch.int64 and dp.scatter_lengths.dim() == 1
    assert torch.equal(dp.model_lengths, dp.lengths) and dp.model_lengths is not dp.lengths
    moved = dp.to(torch.device("meta"))  # a real non-CPU device on every machine
    assert moved.inputs.device.type == moved.scatter_lengths.device.type == "meta"
    assert moved.model_lengths.device.type == "meta"  # travels with the batch, so DataParallel splits it
    assert moved.lengths.device.type == "cpu"  # the token counters never wait for the device
    assert collate_for("dp") is collate_dp and collate_for("ddp") is collate is collate_for("single")


class Recorder(NullLogger):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)


def test_wrap_model_per_mode():
    module = SeqModel("classify", 3, 2, hidden=4, embedding_dim=4, layers=1)
    for mode in ("ddp", "single"):
        log = Recorder()
        assert wrap_model(module, mode, CPU_ONE, log) is module and log.lines == []
    log = Recorder()
    wrapped = wrap_model(module, "dp", CPU_ONE, log)
    assert isinstance(wrapped, torch.nn.DataParallel) and wrapped.module is module
    assert len(log.lines) == 1
    if not torch.cuda.is_available():
        assert wrapped.device_ids == [] and "no GPU is visible" in log.lines[0]
    x, lengths = torch.randn(3, 5, 3), torch.tensor([5, 3, 1])
    assert torch.equal(wrapped(x, lengths), module(x, lengths))
    assert torch.allclose(SplitReplicas(module, 2)(x, lengths), module(x, lengths), atol=1e-6)


# -- training in dp mode, in this process ---------------------------------------------------------

def test_dp_run_logs_once_and_writes_unwrapped_checkpoints(tmp_path, capsys):
    assert main(["train", *TINY, "training.epochs=2", "training.mode=dp", f"logging.root={tmp_path}",
                 "logging.name=dp"]) == 0
    out = capsys.readouterr().out
    assert out.count("training.mode=dp: ") == 1 and "mode dp, world size 1" in out
    ckpt = load_checkpoint(tmp_path / "dp" / "checkpoints" / "last.pt")
    assert ckpt["config"]["training"]["mode"] == "dp"
    assert not any(k.startswith("module.") for k in ckpt["model"])  # the unwrapped module's state
    epochs = [r for r in records(tmp_path / "dp") if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(0 <= r["val_accuracy"] <= 1 for r in epochs)


def test_dp_equals_single_in_one_process(tmp_path):
    """On CPU nn.DataParallel only calls the module and both modes see the same sorted global
    batches: the runs agree (up to rounding)."""
    for mode in ("dp", "single"):
        assert main(["train", *TINY, "training.epochs=2", f"training.mode={mode}", "data.task=tag",
                     "training.monitor=val_loss", "model.execution=packed", f"logging.root={tmp_path}",
                     f"logging.name={mode}"]) == 0
    losses = {m: [r["train_loss"] for r in records(tmp_path / m) if r["kind"] == "train"] for m in ("dp", "single")}
    assert losses["dp"] == pytest.approx(losses["single"], rel=1e-6)
    last = {m: load_checkpoint(tmp_path / m / "checkpoints" / "last.pt")["model"] for m in ("dp", "single")}
    assert max_diff(last["dp"], last["single"]) <= 1e-6


# -- dp beside ddp on 2 real ranks ----------------------------------------------------------------

#: 12 random global batches of 16 per epoch (the ranks' shares differ in size), no dropout.
SMALL = ["data.num_train=192", "data.num_val=37", "data.length_median=10", "data.max_length=40",
         "model.hidden=16", "model.embedding_dim=16", "model.layers=1", "model.dropout=0",
         "batching.strategy=random", "batching.batch_size=16", "batching.eval_batch_size=8",
         "training.epochs=2", "training.warmup_steps=3", "training.log_every=1", "training.lr=0.05",
         "checkpoint.every_steps=5", "checkpoint.keep_last=100", "logging.progress=lines",
         "distributed.backend=gloo"]


def train(root: Path, name: str, mode: str, *overrides: str):
    """ddp: a real torchrun launch of train.py on 2 ranks, returning its output. dp is one process:
    ``ddp_seq.cli.main(["train", ...])`` in this process, what ``python train.py`` runs (train.py only
    calls it), without starting an interpreter and torch again; no output is returned (None)."""
    args = [*SMALL, f"training.mode={mode}", *overrides, f"logging.root={root}", f"logging.name={name}"]
    if mode == "ddp":
        proc = torchrun("train.py", *args, nproc=2).check()
    else:
        assert main(["train", *args]) == 0
        proc = None
    return proc, records(root / name), load_checkpoint(root / name / "checkpoints" / "last.pt")


def task_overrides(task: str) -> list[str]:
    return [f"data.task={task}", "model.execution=packed"] + (["training.monitor=val_loss"] if task == "tag" else [])


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory) -> dict[str, tuple]:
    """The uninterrupted dp run of each task (SMALL + task_overrides), trained once: the dp side of
    test_dp_trains_like_ddp_on_two_ranks, and (classify) the reference of the dp/ddp resume test."""
    root = tmp_path_factory.mktemp("dp")
    runs = {}
    for task in ("classify", "tag"):
        _, recs, ckpt = train(root, f"dp-{task}", "dp", *task_overrides(task))
        runs[task] = (root / f"dp-{task}", recs, ckpt)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("task", ["classify", "tag"])
def test_dp_trains_like_ddp_on_two_ranks(tmp_path, dp_runs, task):
    _, dp, ckpt_dp = dp_runs[task]
    _, ddp, ckpt_ddp = train(tmp_path, "ddp", "ddp", *task_overrides(task))
    steps = {name: [r["train_loss"] for r in recs if r["kind"] == "train"] for name, recs in (("dp", dp), ("ddp", ddp))}
    assert len(steps["dp"]) == len(steps["ddp"]) == 24
    assert steps["dp"] == pytest.approx(steps["ddp"], rel=1e-5, abs=1e-6)
    assert max_diff(ckpt_dp["model"], ckpt_ddp["model"]) <= 1e-5
    val = {name: [r for r in recs if r["kind"] == "epoch"][-1] for name, recs in (("dp", dp), ("ddp", ddp))}
    assert val["dp"]["val_loss"] == pytest.approx(val["ddp"]["val_loss"], rel=1e-5)
    assert val["dp"]["val_accuracy"] == pytest.approx(val["ddp"]["val_accuracy"], abs=1e-12)


@pytest.mark.slow
def test_dp_checkpoint_resumes_under_ddp_and_back(tmp_path, dp_runs):
    """dp to step 5, then ddp on 2 ranks from dp's checkpoint to step 15, then dp from ddp's checkpoint
    to the end: the same run as dp throughout. The dp run is dp_runs' classify run (kept every step)."""
    reference_dir, reference, ckpt_ref = dp_runs["classify"]
    ddp_proc, ddp, _ = train(tmp_path, "ddp", "ddp", *task_overrides("classify"),
                             f"checkpoint.resume={step_path(reference_dir / 'checkpoints', 5)}")
    assert "config changed since, in effect from here: training.mode 'dp' -> 'ddp'" in ddp_proc.stdout
    assert "saved with world size 1" in ddp_proc.stdout
    from_ddp = step_path(tmp_path / "ddp" / "checkpoints", 15)
    _, back, ckpt_back = train(tmp_path, "back", "dp", *task_overrides("classify"), f"checkpoint.resume={from_ddp}")
    losses = {r["step"]: r["train_loss"] for r in reference if r["kind"] == "train"}
    resumed = {r["step"]: r["train_loss"] for r in ddp + back if r["kind"] == "train"}
    assert sorted(resumed)[0] == 6 and max(resumed) == max(losses) == 24
    for step in range(6, 25):
        assert resumed[step] == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step
    assert max_diff(ckpt_back["model"], ckpt_ref["model"]) <= 1e-5


@pytest.mark.slow
def test_dp_under_torchrun_is_refused_with_one_line(tmp_path):
    proc = torchrun("train.py", *TINY, "training.mode=dp", f"logging.root={tmp_path}", timeout=90)
    assert proc.returncode != 0, proc.report()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ddp-seq: error:")]
    assert len(errors) == 1 and errors[0].startswith("ddp-seq: error: training.mode: dp runs in one process"), \
        proc.report()
    assert list(tmp_path.iterdir()) == []
