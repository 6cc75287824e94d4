"""Where a training step's time goes, per rank: data, forward, backward, sync, optimizer, other.

Is a job bound by computation, by data or by synchronisation? :class:`StepTimer` answers it from
the loop itself. The step is cut by marks into contiguous phases, so the phases add up to the
step's time by construction:

- ``data``: waiting for the loader's next batches and copying them to the device;
- ``forward``: the model's forward and the loss (and ``zero_grad``);
- ``backward``: the local backward pass, up to the moment the last parameter's gradient is
  accumulated (a ``post_accumulate_grad`` hook on every trained parameter);
- ``sync``: from there until ``backward()`` returns -- DDP's wait for the gradient all-reduce
  that did not overlap the backward pass -- plus the loop's own collectives (the merged
  loss / token / SIGTERM all-reduce, a loss function's count);
- ``optimizer``: unscaling, clipping, the optimizer and LR scheduler steps;
- ``other``: the rest of the loop (counters, logging, checkpoints).

On the CPU every step is timed (the clock costs ~1 us a mark). CUDA kernels run asynchronously, so
there every ``CUDA_EVERY``-th step is timed with a device synchronisation at each mark, and the
figures are means over those steps.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ddp_seq.loggers.records import PHASES

#: On CUDA, one step in this many is timed (each mark synchronises the device on it).
CUDA_EVERY = 10
#: Advice is given when a phase takes at least this share of the step on average over ranks.
ADVICE_SHARE = 0.15


class StepTimer:
    """Accumulates this rank's time per phase over the steps of one training segment.

    Use: :meth:`start` at the top of a step, :meth:`mark` after each phase, :meth:`backward_done`
    right after ``backward()`` returns, :meth:`end` at the bottom. A timer made with
    ``enabled=False`` does nothing (a training step called outside the Trainer's loop).
    """

    def __init__(self, module: nn.Module | None = None, device: torch.device | None = None,
                 every: int | None = None, enabled: bool = True) -> None:
        self.enabled = enabled
        self.cuda = device is not None and device.type == "cuda"
        self.every = every or (CUDA_EVERY if self.cuda else 1)
        self.totals = dict.fromkeys(PHASES, 0.0)  # seconds over the timed steps
        self.timed_steps = 0
        self.steps = 0
        self._on = False  # whether the current step is timed
        self._last = 0.0  # the clock at the previous mark
        self._grad_at: float | None = None  # the clock when the step's last gradient was accumulated
        self._hooks = []
        if enabled and module is not None:
            self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready)
                           for p in module.parameters() if p.requires_grad]

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _grad_ready(self, _param: torch.Tensor) -> None:
        if self._on:
            self._grad_at = self._now()

    def start(self) -> None:
        """The top of a step (before waiting for its batches)."""
        self._on = self.enabled and self.steps % self.every == 0
        self._grad_at = None
        if self._on:
            self._last = self._now()

    def mark(self, phase: str) -> None:
        """The time since the previous mark was spent in ``phase``."""
        if self._on:
            now = self._now()
            self.totals[phase] += now - self._last
            self._last = now

    def backward_done(self) -> None:
        """Split the time since the previous mark at the last gradient: backward, then sync."""
        if not self._on:
            return
        now = self._now()
        split = self._grad_at if self._grad_at is not None and self._last <= self._grad_at <= now else now
        self.totals["backward"] += split - self._last
        self.totals["sync"] += now - split
        self._last, self._grad_at = now, None

    def end(self) -> None:
        """The bottom of a step: the rest of it was ``other``."""
        if self._on:
            self.mark("other")
            self.timed_steps += 1
        self.steps += 1
        self._on = False

    def ms_per_step(self) -> dict[str, float]:
        """Mean milliseconds per timed step, per phase, and ``step`` (their sum)."""
        n = max(self.timed_steps, 1)
        means = {phase: 1e3 * seconds / n for phase, seconds in self.totals.items()}
        return {"step": sum(means.values()), **means}

    def close(self) -> None:
        """Remove the gradient hooks from the module."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def breakdown_record(per_rank: list[dict[str, float]]) -> dict[str, object]:
    """The epoch record's keys: ``step_ms`` and ``step_ms_<phase>`` (a list, one value per rank), and
    ``sync_share`` / ``data_share``: the phase's share of the step, averaged over ranks."""
    record: dict[str, object] = {"step_ms": [r["step"] for r in per_rank]}
    for phase in PHASES:
        record[f"step_ms_{phase}"] = [r[phase] for r in per_rank]
    for phase in ("sync", "data"):
        record[f"{phase}_share"] = sum(r[phase] / r["step"] if r["step"] else 0.0 for r in per_rank) / len(per_rank)
    return record


def advice(record: dict, world_size: int) -> str | None:
    """A line saying what would make the job faster, when a measured share says it is slower than it
    needs to be; None when nothing stands out. ``record``: an epoch record with the breakdown keys."""
    step = sum(record["step_ms"]) / len(record["step_ms"])
    if world_size > 1 and record["sync_share"] >= ADVICE_SHARE:
        sync = sum(record["step_ms_sync"]) / world_size
        fewer = max(1, world_size // 2)
        return (f"advice: synchronisation took {record['sync_share']:.0%} of each training step ({sync:.1f} of "
                f"{step:.1f} ms, mean over {world_size} ranks): the steps are small for {world_size} ranks, so "
                f"much of each is spent waiting for the gradient all-reduce. Fewer ranks with more threads each "
                f"(--nproc_per_node={fewer}), a larger global batch (batching.batch_size or batching.max_tokens), "
                "or training.grad_accum=2 or more (one all-reduce per several batches) would wait less")
    if record["data_share"] >= ADVICE_SHARE:
        data = sum(record["step_ms_data"]) / len(record["step_ms_data"])
        return (f"advice: waiting for data took {record['data_share']:.0%} of each training step ({data:.1f} of "
                f"{step:.1f} ms, mean over ranks): data.num_workers=2 (collate in worker processes) or a "
                "faster dataset __getitem__ would help")
    return None
