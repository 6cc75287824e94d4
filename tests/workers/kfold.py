"""``cross_validate`` of a user's dataset and model (tests/test_cross_validation.py).

``python tests/workers/kfold.py RUN_DIR [KILL_AT]`` (or under torchrun): 3-fold cross-validation of
the off-road test's token dataset and LSTM model into RUN_DIR; rank 0 prints the result as one JSON
line after ``RESULT``. ``KILL_AT``: SIGKILL this process at that training loss computation of the job
(counted over all folds), as a crash or a node failure would -- after a checkpoint of fold 2.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from off_road import OVERRIDES, ReviewModel, Reviews  # noqa: E402

from ddp_seq import TaskObjective, cross_validate, distributed, load_config  # noqa: E402
from ddp_seq.parallel.process_group import exit_worker  # noqa: E402


class Counting(TaskObjective):
    """The built-in classify objective that counts its training losses and, at ``kill_at``, kills the process."""

    def __init__(self, kill_at: int) -> None:
        super().__init__("classify")
        self.kill_at, self.calls = kill_at, 0

    def loss(self, outputs, batch):
        # a training step, not the Trainer's probe (which runs a backward pass too)
        if outputs.requires_grad and not any(frame.function == "probe" for frame in inspect.stack()):
            self.calls += 1
            if self.calls == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return super().loss(outputs, batch)


def main(run_dir: str, kill_at: int = 0) -> int:
    cfg = load_config(overrides=[*OVERRIDES, "checkpoint.every_steps=3", "training.epochs=2"])
    data = Reviews(300, 0)
    with distributed(cfg.distributed) as info:
        result = cross_validate(lambda: ReviewModel(50, 6), data, folds=3, cfg=cfg,
                                objective=Counting(kill_at) if kill_at else "classify", run_dir=run_dir, info=info)
        if info.is_main:
            print("RESULT" + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    exit_worker(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0))
