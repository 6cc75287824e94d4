"""Where training stands, as a ``state_dict`` with a version key (after fairseq's ``EpochBatchIterator``).

The position is counted in *global* batches of the epoch's plan, which depends on (seed, epoch)
only, so a checkpoint taken with one world size resumes exactly under another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
