"""Where training stands, as a ``state_dict`` with a version key (after fairseq's ``EpochBatchIterator``).

The position is counted in *global* batches of the epoch's plan, which depends on (seed, epoch)
only, so a checkpoint taken with one world size resumes exactly under another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import UserError


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

    VERSION = 1

    step: int = 0
    epoch: int = 0
    position: int = 0
    progress: EpochProgress = field(default_factory=EpochProgress)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stale: int = 0
    finished: bool = False

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (a ``weights_only`` checkpoint holds them), with ``train_state_version``."""
        return {"train_state_version": self.VERSION, "step": self.step, "epoch": self.epoch,
                "position": self.position, "progress": asdict(self.progress), "history": self.history,
                "best": self.best, "stale": self.stale, "finished": self.finished}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Undo :meth:`state_dict` (checkpoints from before the version key count as version 1)."""
        version = state.get("train_state_version", 1)
        if version != self.VERSION:
            raise UserError(f"training state version {version!r}; this ddp_seq reads {self.VERSION}")
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.progress = EpochProgress(**state["progress"])
        self.history, self.best = state["history"], state["best"]
        self.stale, self.finished = state["stale"], state["finished"]


class EpochCounters:
    """The running totals of one training segment (from the epoch's start or a resume to now).

    Kept per rank and reduced only when read, so reading never changes them: the loss window
    (a local sum on the device and the global count) since the last :meth:`flush`, and the token
    counters ``[real tokens, padded tokens of rank 0, ..., of rank W-1]`` (filler steps included).
    """

    def __init__(self, world_size: int, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.loss = torch.zeros(1, dtype=torch.float64, device=device)
        self.count = 0.0
        self.tokens = torch.zeros(1 + world_size, dtype=torch.float64)
        self.sequences = 0  # global sequences since the last log line
        self.tokens_at_log = self.tokens.clone()

    def add(self, loss_sum: torch.Tensor, count: float, batches: list) -> None:
        """One optimizer step over ``batches`` (this rank's shares) with its local loss sum and global count."""
        self.loss += loss_sum
        self.count += count
        self.sequences += sum(b.global_count for b in batches)
        self.tokens[0] += sum(b.real_tokens for b in batches)
        self.tokens[1 + self.rank] += sum(b.padded_tokens for b in batches)

    def flush(self, progress: EpochProgress, reduce) -> float:
        """Move the loss window into ``progress`` (``reduce``: the all-reduce); returns its mean loss."""
        loss_sum = float(reduce(self.loss)[0])
        mean = loss_sum / max(self.count, 1)
        progress.loss_sum += loss_sum
        progress.count += self.count
        self.loss.zero_()
        self.count = 0.0
        return mean

    def since_log(self, reduce) -> tuple[float, float, int]:
        """Global ``(real tokens, padded tokens, sequences)`` since the last call; starts a new log window."""
        delta = self.tokens - self.tokens_at_log
        real, padded = reduce(torch.stack([delta[0], delta[1:].sum()])).tolist()
        sequences, self.sequences, self.tokens_at_log = self.sequences, 0, self.tokens.clone()
        return real, padded, sequences
