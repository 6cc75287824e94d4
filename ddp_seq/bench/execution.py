"""Packed vs padded execution of :class:`~ddp_seq.nn.seq_model.SeqModel`, forward + backward, on one thread:
what ``model.execution=auto`` is chosen from. On a GPU the same matrix times cuDNN's two paths."""

from __future__ import annotations

import statistics
import time
from typing import Any


def execution_matrix(repeats: int = 3, quick: bool = False) -> dict[str, Any]:
    """Packed vs padded forward+backward of SeqModel (2 layers, hidden 128) for every cell and
    direction, on length-bucketed and on random batches: on one CPU thread, or on the GPU (cuDNN)
    when there is one. Alternates the two paths; medians of ``repeats``."""
    import numpy as np
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = _execution_rows(repeats, quick, np.random.default_rng(0), device)
    finally:
        torch.set_num_threads(threads)
    return {"repeats": repeats, "quick": quick, "device": str(device), "variants": rows}


def _execution_rows(repeats: int, quick: bool, rng, device) -> dict[str, dict[str, float]]:
    import numpy as np
    import torch

    from ddp_seq.nn.seq_model import SeqModel

    hidden, batches, batch_size = (16, 2, 8) if quick else (128, 6, 32)

    def make_batch(bucketed: bool):
        lengths = np.clip(rng.lognormal(np.log(45), 0.8, batch_size), 1, 400).astype(np.int64)
        if bucketed:  # a bucketed batch: lengths within a few steps of each other
            lengths = np.full(batch_size, int(np.median(lengths))) + rng.integers(0, 3, batch_size)
        return torch.randn(batch_size, int(lengths.max()), 8, device=device), torch.from_numpy(lengths).to(device)

    rows = {}
    for cell in ("lstm", "gru"):
        for bidirectional in (False, True):
            for bucketed in (True, False):
                data = [make_batch(bucketed) for _ in range(batches)]
                tokens = sum(int(lengths.sum()) for _, lengths in data)
                speed: dict[str, list[float]] = {"packed": [], "padded": []}
                for _ in range(repeats):
                    for execution in speed:
                        torch.manual_seed(0)
                        model = SeqModel("classify", 8, 4, cell=cell, hidden=hidden, layers=2,
                                         bidirectional=bidirectional, execution=execution).to(device)
                        start = time.perf_counter()
                        for x, lengths in data:
                            model(x, lengths).sum().backward()
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        speed[execution].append(tokens / (time.perf_counter() - start))
                name = f"{cell} {'bi' if bidirectional else 'uni'} {'bucket' if bucketed else 'random'}"
                packed, padded = statistics.median(speed["packed"]), statistics.median(speed["padded"])
                rows[name] = {"packed_tokens_per_s": packed, "padded_tokens_per_s": padded,
                              "padded_over_packed": padded / packed}
    return rows
