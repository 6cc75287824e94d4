"""``ddp-seq parity``: ``single``, ``dp`` and ``ddp`` give the same loss and gradients on a fixed batch.

Runs under ``torchrun --nproc_per_node=2`` (``make parity``; started without torchrun, the command
launches torchrun itself). For classify and tag, LSTM and GRU, uni- and bidirectional, packed and
padded execution, a fixed initial model (``training.seed``) and a fixed global batch (the first of
epoch 0 with ``random`` batching, so the ranks' shares differ in size) go through the real
``Trainer.train_step`` of each mode:

- ``single``: one process, the whole global batch in the order it was drawn;
- ``dp``: ``collate_dp``'s length-sorted batch with its lengths tensor, through ``nn.DataParallel``
  when at least 2 GPUs are visible, otherwise through :class:`~ddp_seq.parallel.wrap.SplitReplicas`
  (DataParallel's scatter into 2 chunks along dim 0 and its gather, on one device);
- ``ddp``: the W processes of the job, each its own share and the trainer's ``W * S_r / N``
  normalisation; gradients are read after DDP's all-reduce.

Tolerance: ``|loss - single| <= 2e-6`` and ``max |grad - single| <= 1e-6`` (absolute). The modes
compute the same sums in different orders (other batch compositions, other chunks, an all-reduce),
so in float32 they may differ by rounding only: a gradient entry here is a sum over at most 16
sequences x 30 steps of terms below ~0.2, and reordering it moves it by a few units in the last
place of its partial sums (float32 epsilon is 1.2e-7); the loss is a float32 sum of <= 480 terms
divided by their count. Measured on CPU (torch 2.13, gloo): at most 3.4e-8 on gradients and
2.4e-7 on the loss over all 16 configurations, so the bounds are 8-30x the observed rounding. The
errors the check exists for are >= 150x the gradient bound: a mean of per-rank means moves the
gradients by 5e-3..5e-2, a batch whose targets are not sorted with its inputs by 1.5e-4..1e-2
(tests/test_parity.py computes both and checks they fail).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch

from ddp_seq.builders import build_trainer
from ddp_seq.config import Config, load_config
from ddp_seq.data.collate import Batch, collate_for, fetch
from ddp_seq.data.sampler import Share, split_shares
from ddp_seq.errors import UserError
from ddp_seq.loggers.runlog import NullLogger, format_table
from ddp_seq.parallel.process_group import DistInfo, all_reduce_sum, broadcast_object, distributed
from ddp_seq.parallel.wrap import SplitReplicas
from ddp_seq.train.trainer import Trainer

#: Test-only switch: set to ``mean-of-rank-means`` to break the ddp rows' normalisation on purpose
#: (each rank's loss becomes its own mean / W) and see the check fail (tests/test_parity.py).
FAULT_ENV = "DDP_SEQ_PARITY_TEST_FAULT"

LOSS_ATOL = 2e-6  # see the module doc: ~8x the rounding measured, >= 13x below the smallest real error
GRAD_ATOL = 1e-6  # ~30x the rounding measured, >= 150x below the smallest real error

#: What the cases share: a small 2-layer model, a batch of 16 sequences of 1..30 steps, plain SGD
#: and no clipping (the step must not touch the gradients), no dropout (the modes draw differently).
BASE = ["data.num_train=48", "data.num_val=8", "data.length_median=10", "data.max_length=30",
        "model.hidden=16", "model.embedding_dim=16", "model.layers=2", "model.dropout=0",
        "batching.strategy=random", "batching.batch_size=16", "training.optimizer=sgd", "training.momentum=0",
        "training.lr=0.1", "training.warmup_steps=0", "training.grad_clip=0", "training.amp=none",
        "checkpoint.save=false", "logging.progress=none"]

CASES = [(task, cell, bidirectional, execution) for task in ("classify", "tag") for cell in ("lstm", "gru")
         for bidirectional in (False, True) for execution in ("packed", "padded")]


@dataclass
class Result:
    """One mode's loss (the global batch's mean) and gradients (float64 copies on the CPU)."""

    loss: float
    grads: dict[str, torch.Tensor]


@dataclass
class Row:
    """One line of the table: a mode's result against the ``single`` reference."""

    config: str
    mode: str
    loss: float
    loss_diff: float
    grad_diff: float
    ok: bool


def case_name(task: str, cell: str, bidirectional: bool, execution: str) -> str:
    return f"{task} {cell} {'bi' if bidirectional else 'uni'} {execution}"


def case_config(task: str, cell: str, bidirectional: bool, execution: str, mode: str) -> Config:
    """The config of one case in one mode."""
    extra = ["training.monitor=val_loss"] if task == "tag" else []
    return load_config(overrides=[*BASE, f"data.task={task}", f"model.cell={cell}",
                                  f"model.bidirectional={str(bidirectional).lower()}", f"model.execution={execution}",
                                  f"training.mode={mode}", *extra])


def step_result(trainer: Trainer, batch: Batch) -> Result:
    """One ``Trainer.train_step`` on this rank's ``batch``: the global mean loss and the gradients it left.

    The optimizer step that follows moves the weights but leaves ``.grad`` alone (no clipping).
    """
    local, count = trainer.train_step(batch)
    loss = float(all_reduce_sum(local.reshape(1), trainer.info)[0]) / count
    grads = {name: p.grad.detach().double().cpu().clone() for name, p in trainer.module.named_parameters()}
    return Result(loss, grads)


def _trainer(cfg: Config, info: DistInfo) -> Trainer:
    return build_trainer(cfg, info, NullLogger(), None)


def _batch(trainer: Trainer, share: Share) -> Batch:
    """``share`` of the training set collated as the trainer's mode does, on its device."""
    return collate_for(trainer.mode)(fetch(trainer.train_data, share)).to(trainer.info.device)


def one_process(info: DistInfo) -> DistInfo:
    """A world of one on this process's device, for the one-process modes inside a torchrun job."""
    return DistInfo(rank=0, local_rank=0, world_size=1, local_world_size=1, device=info.device, backend=None)


def single_result(cfg: Config, info: DistInfo) -> tuple[Result, np.ndarray, np.ndarray]:
    """``single``: the whole first global batch of epoch 0, in the order it was drawn; with that
    batch's sample indices and the lengths of the training set."""
    trainer = _trainer(cfg, info)
    trainer.sampler.set_epoch(0)
    batch, lengths = trainer.sampler.batches()[0], trainer.train_data.lengths
    step = Share(batch, True, len(batch), int(lengths[batch].sum()))
    return step_result(trainer, _batch(trainer, step)), batch, lengths


def dp_result(cfg: Config, info: DistInfo) -> tuple[Result, str]:
    """``dp``: collate_dp's batch through DataParallel (>= 2 GPUs) or its split on one device; and how."""
    trainer = _trainer(cfg, info)
    gpus = len(getattr(trainer.model, "device_ids", []))
    if gpus >= 2:
        how = f"nn.DataParallel over {gpus} GPUs"
    else:
        trainer.model = SplitReplicas(trainer.module, 2)
        how = "DataParallel's split into 2 chunks along dim 0 and its gather, on one device"
    trainer.sampler.set_epoch(0)
    step = next(iter(trainer.sampler))
    return step_result(trainer, _batch(trainer, step)), how


def ddp_result(cfg: Config, info: DistInfo) -> Result:
    """``ddp``: every rank of the job trains its share; a collective, called by every rank."""
    trainer = _trainer(cfg, info)
    trainer.sampler.set_epoch(0)
    step = next(iter(trainer.sampler))
    batch = _batch(trainer, step)
    if os.environ.get(FAULT_ENV) == "mean-of-rank-means":
        # The trainer scales by W / global count; claiming W x this share's count makes each rank's
        # loss its own mean / W, so DDP's average becomes the mean of the per-rank means.
        w = info.world_size
        batch = replace(batch, global_count=w * len(step.indices), global_tokens=w * batch.real_tokens)
    return step_result(trainer, batch)


def max_grad_diff(reference: Result, result: Result) -> float:
    assert reference.grads.keys() == result.grads.keys()
    return max(float((reference.grads[k] - result.grads[k]).abs().max()) for k in reference.grads)


def compare(config: str, mode: str, reference: Result, result: Result) -> Row:
    """One table row: ``result`` against the ``single`` reference, within the module's tolerance."""
    loss_diff = abs(result.loss - reference.loss)
    grad_diff = max_grad_diff(reference, result)
    ok = loss_diff <= LOSS_ATOL and grad_diff <= GRAD_ATOL
    return Row(config, mode, result.loss, loss_diff, grad_diff, ok)


def render(rows: list[Row]) -> str:
    """The parity table: config, mode, loss, |loss - single|, max |grad - single|, ok."""
    table = [{"config": r.config, "mode": r.mode, "loss": f"{r.loss:.6f}",
              "|loss - single|": "-" if r.mode == "single" else f"{r.loss_diff:.1e}",
              "max |grad - single|": "-" if r.mode == "single" else f"{r.grad_diff:.1e}",
              "ok": "" if r.mode == "single" else ("ok" if r.ok else "FAIL")} for r in rows]
    return format_table(table, list(table[0]))


def run(info: DistInfo) -> tuple[list[Row], list[str]]:
    """Every case in every mode; rows and header notes on rank 0 (empty lists on the other ranks)."""
    rows: list[Row] = []
    notes: list[str] = []
    for case in CASES:
        name = case_name(*case)
        ddp = ddp_result(case_config(*case, "ddp"), info)  # every rank, before rank 0 works alone
        if not info.is_main:
            continue
        one = one_process(info)
        single, batch, lengths = single_result(case_config(*case, "single"), one)
        dp, how = dp_result(case_config(*case, "dp"), one)
        rows += [compare(name, "single", single, single), compare(name, "dp", single, dp),
                 compare(name, f"ddp x{info.world_size}", single, ddp)]
        if not notes:
            shares = split_shares(batch, lengths, info.world_size)
            notes = [f"one training step on a fixed global batch of {len(batch)} sequences "
                     f"(lengths {int(lengths[batch].min())}..{int(lengths[batch].max())}) from a fixed initial model;",
                     "single: one process, the whole batch as drawn; "
                     f"dp: collate_dp (sorted, lengths tensor) + {how}; ddp: {info.world_size} processes "
                     f"({info.backend}), shares of {' + '.join(str(len(s)) for s in shares)} sequences "
                     f"({' + '.join(str(int(lengths[s].sum())) for s in shares)} tokens);",
                     f"tolerance: |loss - single| <= {LOSS_ATOL:g}, max |grad - single| <= {GRAD_ATOL:g} "
                     "(float32 summation-order rounding; see ddp_seq/cli/parity.py)"]
    return rows, notes


def _relaunch(nproc: int) -> int:
    """Not under torchrun: run this command again under torchrun with ``nproc`` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddp_seq", "parity"]
    return subprocess.call(cmd)


def main(argv: list[str] | None = None) -> int:
    """``ddp-seq parity [--nproc N]``: print the table; exit 1 if any row exceeds the tolerance."""
    from ddp_seq.parallel.process_group import exit_worker

    parser = argparse.ArgumentParser(prog="ddp-seq parity", description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes for the ddp rows when torchrun is "
                        "started by this command (under torchrun: its --nproc_per_node)")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        return _relaunch(args.nproc)
    try:
        if int(os.environ["WORLD_SIZE"]) < 2:
            raise UserError("parity: the ddp rows need at least 2 processes; run it under "
                            "torchrun --nproc_per_node=2 (or without torchrun: it starts torchrun itself)")
        # TF32 would round inputs of matrix products to 10 bits: differences far above the tolerance
        # that say nothing about how the modes split the work.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        with distributed(load_config(overrides=BASE).distributed) as info:
            rows, notes = run(info)
            code = 0
            if info.is_main:
                failed = [r for r in rows if not r.ok]
                print("\n".join(["parity: " + notes[0], *notes[1:], "", render(rows), ""]), flush=True)
                print(f"parity: FAILED, {len(failed)} of {len(rows)} rows exceed the tolerance" if failed
                      else f"parity: OK, every mode within the tolerance in all {len(CASES)} configurations",
                      flush=True)
                code = 1 if failed else 0
            code = int(broadcast_object(code, info))  # every rank exits with the verdict
    except UserError as e:
        if os.environ.get("RANK", "0") in ("", "0"):
            print(f"ddp-seq: error: {e}", file=sys.stderr, flush=True)
        code = 2
    exit_worker(code)
    return code
