"""Training that stops at the first non-finite gradient norm or loss instead of training on through
NaN (issue 26, row 2; keras ``TerminateOnNaN``, open_lm's NaN check).

Where it is checked, and why every rank decides the same:

- every optimizer step, the *global* gradient norm (after DDP's all-reduce the gradients, hence
  their norm, are the same on every rank) is noted on the device by :class:`NonFiniteWatch` --
  a few tiny kernels, no wait for the device -- and read where the loop waits for the device
  anyway (its all-reduce of the loss window every ``checkpoint.signal_check_steps`` or
  ``training.log_every`` steps, every step in one process, and before every checkpoint): every
  rank raises :class:`Diverged` at the same step, naming the first step whose norm was not finite;
- every logged step, the loss window (all-reduced, so global too);
- every checkpoint, the weights themselves (the same on every rank): a checkpoint with non-finite
  weights is never written, so the newest checkpoint is always one to resume from.

With ``training.amp=fp16`` the grad scaler skips steps with non-finite gradients and lowers its
scale (that is how fp16 training works), so only the loss and the weights are checked there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch

#: The exit code of a training run stopped by :class:`Diverged` (2 is bad input, 1 a crash).
EXIT_DIVERGED = 3


class Diverged(RuntimeError):
    """Raised on every rank at the same step when training produced a NaN or infinity.

    Attributes: ``what`` (``"gradient norm"``, ``"training loss"``, ``"weights"``), ``value``,
    ``step`` (the optimizer step that produced it, 1-based), ``epoch`` (1-based), ``checkpoint``
    (the newest checkpoint, all finite, or None).
    """

    def __init__(self, what: str, value: float, step: int, epoch: int, checkpoint: Path | None,
                 best: str = "") -> None:
        self.what, self.value, self.step, self.epoch, self.checkpoint = what, value, step, epoch, checkpoint
        # The gradient that blew up was computed at the newest weights, and those may be finite but
        # ruined already (a loss of 1e20): the best epoch's checkpoint is named too, as a safer start.
        where = (f"the newest checkpoint, {checkpoint}, is finite, but its weights may be ruined already"
                 + (f"; the best epoch's is {best}" if best else "")
                 + ": lower training.lr or set training.grad_clip, and resume from one of them or an earlier one "
                 "(checkpoint.resume=PATH)") if checkpoint else "no checkpoint was written"
        super().__init__(f"training diverged: non-finite {what} ({value}) at step {step}, epoch {epoch}; "
                         f"stopped there, and no checkpoint holds it; {where}")


class NonFiniteWatch:
    """The first optimizer step whose gradient norm was NaN or infinite, and that norm, kept on the
    device: :meth:`note` costs a few tiny kernels and never waits for the device; :meth:`seen`
    reads it (a wait: call it where the loop waits anyway)."""

    def __init__(self, device: torch.device) -> None:
        self.step = torch.zeros((), dtype=torch.int64, device=device)  # 0: every norm so far finite
        self.value = torch.zeros((), dtype=torch.float32, device=device)

    def note(self, norm: torch.Tensor, step: int) -> None:
        """Record ``norm`` of optimizer step ``step`` (1-based) if it is the first non-finite one."""
        first = (self.step == 0) & ~torch.isfinite(norm)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, norm.detach().float(), self.value)

    def seen(self) -> tuple[int, float] | None:
        """``(step, norm)`` of the first non-finite norm noted, or None."""
        step = int(self.step)
        return (step, float(self.value)) if step else None


def gradient_norm(parameters: Iterable[torch.nn.Parameter], clip: float) -> torch.Tensor:
    """The global L2 norm of the gradients (a 0-d tensor on their device), clipped to ``clip`` first
    when ``clip`` > 0 (``clip_grad_norm_`` returns the norm before clipping)."""
    parameters = [p for p in parameters if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(parameters, clip)
    if not parameters:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm([p.grad for p in parameters])


def finite(value: torch.Tensor | float) -> bool:
    """Whether a scalar is finite (reads a device tensor: a sync)."""
    return bool(torch.isfinite(value)) if torch.is_tensor(value) else math.isfinite(value)
