"""Train one config through the library and count the loop's own collectives.

``torchrun ... tests/workers/step_breakdown.py OUT.json section.key=value ...``: builds the config's
built-in data and model, wraps ``torch.distributed.all_reduce`` with a counter (DDP's gradient
all-reduce goes through its C++ reducer, not this function, so only the loop's own collectives
and evaluation's count), trains, and rank 0 writes the epoch records, the summary and the counts.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from ddp_seq import Trainer, load_config
from ddp_seq.builders import build_parts
from ddp_seq.process_group import distributed, exit_worker


def main() -> None:
    out, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(None, ["checkpoint.save=false", "logging.progress=none", *overrides])
    calls = {"all_reduce": 0}
    original = dist.all_reduce

    def counted(*args, **kwargs):
        calls["all_reduce"] += 1
        return original(*args, **kwargs)

    with distributed(cfg.distributed) as info:
        parts = build_parts(cfg, info)
        trainer = Trainer(parts.model, parts.data.train, parts.data.val, cfg, info=info)
        dist.all_reduce = counted
        try:
            summary = trainer.fit()
        finally:
            dist.all_reduce = original
        if info.is_main:
            with open(out, "w") as f:
                json.dump({"history": trainer.state.history, "summary": {k: v for k, v in summary.items()
                                                                         if k != "best_metrics"},
                           "steps": trainer.state.step, "all_reduce_calls": calls["all_reduce"]}, f)
    exit_worker(0)


if __name__ == "__main__":
    main()
