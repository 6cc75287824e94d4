"""Where training stands, as a ``state_dict`` with a version key (after fairseq's ``EpochBatchIterator``).

The position is counted in *global* batches of the epoch's plan, which depends on (seed, epoch)
only, so a checkpoint taken with one world size resumes exactly under another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ddp_seq.errors import UserError


@dataclass
class EpochProgress:
    """Global totals of the epoch in progress, carried through a mid-epoch checkpoint."""

    loss_sum: float = 0.0  # summed over every rank
    count: float = 0.0  # the global count the loss is divided by
    real_tokens: float = 0.0
    padded_tokens: float = 0.0  # over all ranks, filler steps included
    seconds: float = 0.0


@dataclass
class TrainState:
    """The loop's state: ``(epoch, position)`` is the next global batch to train; ``step`` counts
    optimizer steps; ``history`` holds one record per finished epoch; ``best`` the best epoch's
    monitored value; ``stale`` epochs since it improved; ``finished`` whether the run is done."""

    # 1: everything above, in a flat checkpoint (format 2). 2: without (epoch, position), which
    # the checkpoint keeps as the sampler's part (the data position).
    VERSION = 2

    step: int = 0
    epoch: int = 0
    position: int = 0
    progress: EpochProgress = field(default_factory=EpochProgress)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stale: int = 0
    finished: bool = False

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (a ``weights_only`` checkpoint holds them), with ``version``. ``epoch``
        and ``position`` are not in it: they are the sampler's state (``BucketBatchSampler.state_dict``)."""
        return {"version": self.VERSION, "step": self.step, "progress": asdict(self.progress),
                "history": self.history, "best": self.best, "stale": self.stale, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Undo :meth:`state_dict` (``epoch`` and ``position`` are left as they are: set them from
        the sampler's state)."""
        version = state.get("version")
        if version != self.VERSION:
            raise UserError(f"training state version {version!r}; this ddp_seq reads {self.VERSION}")
        self.step = state["step"]
        self.progress = EpochProgress(**state["progress"])
        self.history, self.best = state["history"], state["best"]
        self.stale, self.finished = state["stale"], state["finished"]


class EpochCounters:
    """The running totals of one training segment (from the epoch's start or a resume to now).

    Each rank adds its steps to *pending* local values: the loss sum (on the device, so no step
    waits for it), its real tokens and its padded tokens. :meth:`reduce` sums the pending values
    of every rank, together with the SIGTERM flag, in **one** all-reduce and adds them to the
    segment's global totals and to the log window; reading those needs no collective. The loop
    calls it only at the steps that need global figures (a log line, a SIGTERM check, a checkpoint,
    the epoch's end), so a step costs at most one collective besides DDP's gradients.
    """

    def __init__(self, world_size: int, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.pending_loss = torch.zeros(1, dtype=torch.float64, device=device)
        self.pending = torch.zeros(2 + world_size, dtype=torch.float64)  # [real, padded of rank 0..W-1, stop]
        self.pending_count = 0.0  # the global count, the same on every rank: never reduced
        self.real_tokens = 0.0  # the segment's global totals (reduced)
        self.padded_per_rank = [0.0] * world_size
        self.window = [0.0, 0.0, 0.0, 0.0, 0]  # since the last log line: loss sum, count, real, padded, sequences

    def add(self, loss_sum: torch.Tensor, count: float, batches: list) -> None:
        """One optimizer step over ``batches`` (this rank's shares) with its local loss sum and global count."""
        self.pending_loss += loss_sum
        self.pending_count += count
        self.window[4] += sum(b.global_count for b in batches)
        self.pending[0] += sum(b.real_tokens for b in batches)
        self.pending[1 + self.rank] += sum(b.padded_tokens for b in batches)

    def reduce(self, progress: EpochProgress, reduce, stop: bool = False) -> bool:
        """One all-reduce (``reduce``) of every rank's pending values and SIGTERM flag; moves the loss
        into ``progress`` and the tokens into the segment's totals. Returns whether any rank got SIGTERM."""
        self.pending[-1] = 1.0 if stop else 0.0
        loss = self.pending_loss.cpu()  # waits for the device once per reduce, not per step
        values = reduce(torch.cat([loss, self.pending])).tolist()
        loss_sum, real, padded, stopping = values[0], values[1], values[2:-1], values[-1] > 0
        progress.loss_sum += loss_sum
        progress.count += self.pending_count
        self.real_tokens += real
        self.padded_per_rank = [a + b for a, b in zip(self.padded_per_rank, padded)]
        w = self.window
        w[0], w[1], w[2], w[3] = w[0] + loss_sum, w[1] + self.pending_count, w[2] + real, w[3] + sum(padded)
        self.pending_loss.zero_()
        self.pending.zero_()
        self.pending_count = 0.0
        return stopping

    def take_window(self) -> tuple[float, float, float, int]:
        """The log window's global ``(mean loss, real tokens, padded tokens, sequences)`` since the last
        call, as of the last :meth:`reduce`; starts a new window. No collective."""
        loss_sum, count, real, padded, sequences = self.window
        self.window = [0.0, 0.0, 0.0, 0.0, 0]
        return loss_sum / max(count, 1), real, padded, sequences


def epoch_record(epoch: int, totals: EpochProgress, padded_per_rank, step_times: list[float], sequences: int,
                 straggler: float, checkpoint_s: float, peak_rss_mb: list[float]) -> dict:
    """The ``epoch`` record of ``metrics.jsonl`` (without the step breakdown): ``epoch`` is 0-based
    here and 1-based in the record; rates are per second of the epoch's training time."""
    times = np.sort(np.asarray(step_times)) if step_times else np.zeros(1)
    return {"epoch": epoch + 1, "train_loss": totals.loss_sum / max(totals.count, 1),
            "train_s": totals.seconds, "seq_per_s": sequences / totals.seconds,
            "tokens_per_s": totals.real_tokens / totals.seconds,
            "padding_efficiency": totals.real_tokens / max(totals.padded_tokens, 1),
            "real_tokens": int(totals.real_tokens), "padded_tokens_per_rank": [int(t) for t in padded_per_rank],
            "straggler_ratio": straggler, "step_s_p50": float(np.percentile(times, 50)),
            "step_s_p90": float(np.percentile(times, 90)), "step_s_max": float(times[-1]),
            "checkpoint_s": checkpoint_s, "peak_rss_mb": peak_rss_mb}
