"""Mixed precision (``training.amp``): whether a device computes in bf16 natively, ``auto`` decided
once for a device, and the autocast context of a forward pass."""

from __future__ import annotations

import contextlib

import torch


def native_bf16(device: torch.device) -> str | None:
    """Why ``device`` computes in bf16 natively (e.g. ``"avx512_bf16"``), or None when it does not."""
    if device.type == "cuda":
        return "CUDA bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    checks = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    for name, check in checks:  # torch.cpu's probes of the CPU's instruction sets (private, hence getattr)
        probe = getattr(torch.cpu, check, None)
        if probe is not None and probe():
            return name
    return None


def resolve_amp(amp: str, device: torch.device) -> str:
    """``training.amp`` with ``auto`` decided for ``device``: bf16 where it is native, else none."""
    if amp != "auto":
        return amp
    return "bf16" if native_bf16(device) else "none"


def autocast(device: torch.device, amp: str):
    """The autocast context for ``training.amp`` (a no-op context for ``none``; ``auto`` resolved)."""
    amp = resolve_amp(amp, device)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
