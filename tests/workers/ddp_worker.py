"""Test worker: one rank of a real job (under torchrun) or a single process (without it).

Usage: ``python tests/workers/ddp_worker.py SPEC.json OUT_DIR``

``SPEC.json`` holds ``{"scenarios": [{"name": str, "overrides": [str, ...]}, ...]}``. For each
scenario every rank builds the real :class:`ddp_seq.train.trainer.Trainer` from the overrides, evaluates
the freshly initialised model on the validation split, takes ONE optimizer step through
``Trainer.train_step`` on its shares of the first ``training.grad_accum`` global batches of epoch 0
(one global batch unless gradients are accumulated), and evaluates again.

Written under OUT_DIR (world size W):
  ``<name>.W<W>.pt``          rank 0: ``{"before": state_dict, "after": state_dict}``
  ``<name>.W<W>.json``        rank 0: evaluate() metrics before/after the step, the step's lr
  ``<name>.W<W>.r<rank>.json``  every rank: per global batch, the indices of its share and whether it
                              was real; its local loss sum
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ddp_seq.builders import build_trainer
from ddp_seq.config import load_config
from ddp_seq.data.collate import collate, fetch
from ddp_seq.loggers.runlog import NullLogger
from ddp_seq.parallel import process_group as ddist
from ddp_seq.parallel.process_group import exit_worker
from ddp_seq.train.evaluation import evaluate


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def main(spec_path: str, out_dir: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = load_config(overrides=spec["scenarios"][0]["overrides"])
    with ddist.distributed(first.distributed) as info:
        w = info.world_size
        for scenario in spec["scenarios"]:
            name = scenario["name"]
            cfg = load_config(overrides=scenario["overrides"])
            trainer = build_trainer(cfg, info, NullLogger(), None)
            before = _state(trainer.module)
            val_before = evaluate(trainer.module, trainer.val_data, cfg, info)

            trainer.model.train()
            trainer.sampler.set_epoch(0)
            steps = list(trainer.sampler)[:cfg.training.grad_accum]
            batches = [collate(fetch(trainer.train_data, step)).to(info.device) for step in steps]
            lr = trainer.optimizer.param_groups[0]["lr"]  # the rate this step applies
            local_sum, _ = trainer.train_step(*batches)

            after = _state(trainer.module)
            val_after = evaluate(trainer.module, trainer.val_data, cfg, info)
            share = {"rank": info.rank, "world_size": w, "local_loss_sum": float(local_sum),
                     "steps": [{"indices": [int(i) for i in step.indices], "real": bool(step.real),
                                "global_count": step.global_count, "global_tokens": step.global_tokens}
                               for step in steps]}
            (out / f"{name}.W{w}.r{info.rank}.json").write_text(json.dumps(share))
            if info.is_main:
                torch.save({"before": before, "after": after}, out / f"{name}.W{w}.pt")
                (out / f"{name}.W{w}.json").write_text(json.dumps({"before": val_before, "after": val_after,
                                                                   "lr": lr}))
            # Free the DDP wrapper now, as ddp_seq.cli.train does: a DDP module still alive while one rank
            # destroys the gloo group and another is still busy can abort a rank at exit
            # ("terminate called without an active exception", seen with torch 2.13 on CPU).
            del trainer, batches
        if info.distributed:
            torch.distributed.barrier()  # every rank has written its files before any tears down
    return 0


if __name__ == "__main__":
    code = main(*sys.argv[1:])
    exit_worker(code)  # under torchrun: skip the interpreter finalisation that can abort (see cli)
    sys.exit(code)
