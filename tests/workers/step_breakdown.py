"""Train several configs through the library, one after another in one job, and count the loop's own
collectives of each.

``torchrun ... tests/workers/step_breakdown.py SPEC.json``, SPEC: ``{"mark": MARK, "runs": [{"name": ...,
"out": OUT.json, "overrides": ["section.key=value", ...]}, ...]}``. For each run: builds the config's built-in
data and model, wraps ``torch.distributed.all_reduce`` with a counter (DDP's gradient all-reduce goes
through its C++ reducer, not this function, so only the loop's own collectives and evaluation's
count), trains, and rank 0 writes the epoch records, the summary and the counts to its OUT. Before
each run rank 0 prints ``MARK + name`` on a line of its own, so a test can tell the runs' output apart.
The runs share one process group (one launch instead of one per run: startup is most of a small
job's cost), so their distributed sections must agree.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from ddp_seq import Trainer, load_config
from ddp_seq.builders import build_parts
from ddp_seq.parallel.process_group import distributed, exit_worker


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    runs = spec["runs"]
    configs = [load_config(None, ["checkpoint.save=false", "logging.progress=none", *run["overrides"]])
               for run in runs]
    assert all(cfg.distributed == configs[0].distributed for cfg in configs), "one process group for all runs"
    original = dist.all_reduce
    with distributed(configs[0].distributed) as info:
        for run, cfg in zip(runs, configs):
            calls = {"all_reduce": 0}

            def counted(*args, _calls=calls, **kwargs):
                _calls["all_reduce"] += 1
                return original(*args, **kwargs)

            if info.is_main:
                print(spec["mark"] + run["name"], flush=True)
            parts = build_parts(cfg, info)
            trainer = Trainer(parts.model, parts.data.train, parts.data.val, cfg, info=info)
            dist.all_reduce = counted
            try:
                summary = trainer.fit()
            finally:
                dist.all_reduce = original
            if info.is_main:
                with open(run["out"], "w") as f:
                    json.dump({"history": trainer.state.history,
                               "summary": {k: v for k, v in summary.items() if k != "best_metrics"},
                               "steps": trainer.state.step, "all_reduce_calls": calls["all_reduce"]}, f)
    exit_worker(0)


if __name__ == "__main__":
    main()
