"""``ddp-seq bench --suite scale``: the sampler at cluster sizes, in one process.

For world sizes 1 to 1,024 and up to 10M sequences (``batch_size = 64 x ranks``), side by side on
the same lengths in the same run:

- **ddp_seq**: :class:`~ddp_seq.data.sampler.BucketBatchSampler` (bucket, the default), rank 0's
  epoch of shares: what every rank pays, each on its own;
- **DistributedSampler + BatchSampler** (torch): each rank's strided slice of a shuffle, in batches
  of 64;
- **length-grouped**: the sampler Hugging Face's Trainer uses with ``group_by_length`` (a shuffle cut
  into megabatches of 50 batches, each sorted longest first, the longest batch first), which
  Lightning users build by hand; every rank computes the whole order and keeps every W-th batch of
  64 (as accelerate shards a batch sampler).

Times are rank 0's: the first batch, the epoch, per batch. Padding efficiency (real / padded tokens
over every rank's batches) and the straggler ratio (sum over steps of the costliest rank's padded
tokens / of the mean rank's) are computed for every rank, simulated in this process. A fresh process
reads 10M and 100M lengths memory-mapped from an int16 ``.npy`` and reports the time to its first
share and its peak RSS. Lengths: lognormal (median 45, sigma 0.8, at most 400: the default task's),
bimodal (half around 12, half around 250), and a user's (``--lengths-from`` a data file, or the
data of ``--config``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Sequences per rank per step (the global batch is 64 x ranks for ddp_seq).
PER_RANK = 64
#: (lengths, sequences, ranks) of the full suite; the user's lengths run at USER_RANKS.
FULL_ROWS = [("lognormal", 1_000_000, r) for r in (1, 8, 64, 256, 1024)] + [
    ("lognormal", 10_000_000, 64), ("bimodal", 1_000_000, 8), ("bimodal", 1_000_000, 1024),
    ("bimodal", 10_000_000, 64)]
QUICK_ROWS = [("lognormal", 3000, r) for r in (1, 4, 64)] + [("bimodal", 3000, 4)]
USER_RANKS = (1, 8, 64, 1024)
#: Sequences of the fresh-process probes (memory-mapped lengths): time to the first share, peak RSS.
FULL_PROBES, QUICK_PROBES, PROBE_RANKS = (10_000_000, 100_000_000), (20_000,), 64


def synthetic_lengths(kind: str, n: int, seed: int = 0) -> np.ndarray:
    """``n`` lengths ``[n]`` int16 in [1, 400], drawn in chunks (100M never holds float64 at once)."""
    rng, out, chunk = np.random.default_rng(seed), np.empty(n, dtype=np.int16), 1 << 22
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        if kind == "lognormal":
            draw = rng.lognormal(np.log(45), 0.8, size)
        elif kind == "bimodal":
            draw = np.where(rng.random(size) < 0.5, rng.lognormal(np.log(12), 0.3, size),
                            rng.lognormal(np.log(250), 0.2, size))
        else:
            raise ValueError(f"unknown length distribution {kind!r}")
        out[start:start + size] = np.clip(np.rint(draw), 1, 400)
    return out


def length_grouped_order(lengths: list[int], batch_size: int, generator) -> list[int]:
    """A length-grouped epoch order as Hugging Face's ``LengthGroupedSampler`` makes it (written
    here, not imported): a shuffle cut into megabatches of ``min(n // (4 x batch), 50)`` batches, each
    sorted longest first in Python, and the longest sequence's megabatch leader swapped to the front
    (so an out-of-memory shows in the first step)."""
    import torch

    n = len(lengths)
    mega = max(1, min(n // (batch_size * 4), 50)) * batch_size
    shuffled = torch.randperm(n, generator=generator).tolist()
    groups = [sorted(shuffled[i:i + mega], key=lengths.__getitem__, reverse=True) for i in range(0, n, mega)]
    leaders = [lengths[g[0]] for g in groups]
    top = leaders.index(max(leaders))
    groups[0][0], groups[top][0] = groups[top][0], groups[0][0]
    return [i for g in groups for i in g]


def _timed(batches) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds for all, batches) of an iterable built inside the timing."""
    start = time.perf_counter()
    it = iter(batches())
    next(it, None)
    first = time.perf_counter() - start
    count = 1 + sum(1 for _ in it)
    return first, time.perf_counter() - start, count


def _figures(step_costs: np.ndarray, real: int) -> dict[str, float]:
    """Padding efficiency and straggler ratio from padded tokens ``[steps, ranks]``."""
    padded = float(step_costs.sum())
    mean = step_costs.mean(axis=1).sum()
    return {"padding_efficiency": real / padded if padded else 1.0,
            "straggler_ratio": float(step_costs.max(axis=1).sum() / mean) if mean else 1.0}


def _batch_costs(lens: np.ndarray, size: int) -> np.ndarray:
    """Padded tokens of consecutive batches of ``size`` over ``lens`` ``[m]`` (the last may be short)."""
    m = len(lens)
    full = np.zeros(-(-m // size) * size, dtype=np.int64)
    full[:m] = lens
    longest = full.reshape(-1, size).max(axis=1)
    counts = np.full(len(longest), size, dtype=np.int64)
    if m % size:
        counts[-1] = m % size
    return counts * longest


def ddp_seq_row(lengths: np.ndarray, ranks: int) -> dict[str, Any]:
    from ddp_seq.data.sampler import BucketBatchSampler, share_costs

    first, epoch, steps = _timed(lambda: BucketBatchSampler(lengths, PER_RANK * ranks, num_replicas=ranks,
                                                             rank=0, seed=0))
    sampler = BucketBatchSampler(lengths, PER_RANK * ranks, num_replicas=ranks, rank=0, seed=0)
    start = time.perf_counter()
    _, padded = share_costs(sampler.batches(), sampler.lengths, ranks)
    every = time.perf_counter() - start
    return {"first_s": first, "epoch_s": epoch, "steps": steps, "per_step_ms": 1000 * epoch / steps,
            "all_ranks_figures_s": every, **_figures(padded, int(lengths.sum(dtype=np.int64)))}


def distributed_row(lengths: np.ndarray, ranks: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import BatchSampler, DistributedSampler

    n = len(lengths)

    def rank0():
        sampler = DistributedSampler(range(n), num_replicas=ranks, rank=0, shuffle=True, seed=0)
        return BatchSampler(sampler, PER_RANK, drop_last=False)

    first, epoch, steps = _timed(rank0)
    # Every rank's batches: DistributedSampler pads the shuffle to a multiple of the ranks with its head.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).numpy()
    total = -(-n // ranks) * ranks
    order = np.concatenate([order, order[:total - n]])
    costs = np.stack([_batch_costs(lengths[order[r::ranks]], PER_RANK) for r in range(ranks)], axis=1)
    return {"first_s": first, "epoch_s": epoch, "steps": steps, "per_step_ms": 1000 * epoch / steps,
            **_figures(costs, int(lengths[order].sum(dtype=np.int64)))}


def grouped_row(lengths: np.ndarray, ranks: int) -> dict[str, Any]:
    import torch

    as_list = lengths.tolist()  # LengthGroupedSampler keeps the lengths as a Python list
    kept: list[list[int]] = []

    def rank0():
        order = length_grouped_order(as_list, PER_RANK, torch.Generator().manual_seed(0))
        kept.append(order)
        return (order[k:k + PER_RANK] for k in range(0, len(order), PER_RANK * ranks))

    first, epoch, steps = _timed(rank0)
    costs = _batch_costs(lengths[np.asarray(kept[0])], PER_RANK)
    steps_all = -(-len(costs) // ranks)
    grid = np.zeros(steps_all * ranks, dtype=np.int64)  # batch j goes to rank j % W at step j // W
    grid[:len(costs)] = costs
    return {"first_s": first, "epoch_s": epoch, "steps": steps, "per_step_ms": 1000 * epoch / steps,
            **_figures(grid.reshape(steps_all, ranks), int(lengths.sum(dtype=np.int64)))}


def compare(name: str, lengths: np.ndarray, ranks: int) -> dict[str, Any]:
    """One row: the three samplers on the same lengths and ranks, and ddp_seq's ratios to the peers."""
    row = {"lengths": name, "sequences": len(lengths), "ranks": ranks, "global_batch": PER_RANK * ranks,
           "ddp_seq": ddp_seq_row(lengths, ranks), "distributed": distributed_row(lengths, ranks),
           "grouped": grouped_row(lengths, ranks)}
    row["epoch_vs_distributed"] = row["ddp_seq"]["epoch_s"] / row["distributed"]["epoch_s"]
    row["epoch_vs_grouped"] = row["ddp_seq"]["epoch_s"] / row["grouped"]["epoch_s"]
    print(f"  {name} {len(lengths):,} x {ranks} ranks: ddp_seq {row['ddp_seq']['epoch_s']:.2f}s "
          f"({row['epoch_vs_distributed']:.2f}x DistributedSampler, {row['epoch_vs_grouped']:.2f}x length-grouped)",
          flush=True)
    return row


PROBE = """
import json, sys, time
import numpy as np
from ddp_seq.data.readers.files import is_memory_mapped
from ddp_seq.data.sampler import BucketBatchSampler
def peak_mb():  # VmHWM: this process's peak RSS since its exec (ru_maxrss would keep the forking parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
path, ranks = sys.argv[1], int(sys.argv[2])
before = peak_mb()
start = time.perf_counter()
lengths = np.load(path, mmap_mode="r")
sampler = BucketBatchSampler(lengths, 64 * ranks, num_replicas=ranks, rank=0, seed=0)
shares = iter(sampler)
next(shares)
first = time.perf_counter() - start
steps = 1 + sum(1 for _ in shares)
print(json.dumps({"first_s": first, "epoch_s": time.perf_counter() - start, "steps": steps,
                  "lengths_dtype": str(sampler.lengths.dtype), "mapped": is_memory_mapped(sampler.lengths),
                  "rss_before_mb": before, "peak_rss_mb": peak_mb()}))
"""


def probe(n: int, ranks: int, folder: Path) -> dict[str, Any]:
    """A fresh process: lengths memory-mapped from an int16 .npy, rank 0's sampler to its first share and
    through the epoch; its peak RSS (Linux ``VmHWM``: the mapped pages it touched count, though the
    ranks of a node share them through the page cache)."""
    path = folder / f"lengths-{n}.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.int16, shape=(n,))
    out[:] = synthetic_lengths("lognormal", n)
    out.flush()
    del out
    proc = subprocess.run([sys.executable, "-c", PROBE, str(path), str(ranks)], capture_output=True, text=True)
    path.unlink()
    if proc.returncode:
        raise RuntimeError(f"scale probe at {n:,} sequences failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = {"sequences": n, "ranks": ranks, **json.loads(proc.stdout.strip().splitlines()[-1])}
    print(f"  probe {n:,} x {ranks} ranks: first share {result['first_s']:.2f}s, epoch {result['epoch_s']:.1f}s, "
          f"peak RSS {result['peak_rss_mb']:,.0f} MiB", flush=True)
    return result


def run_scale(quick: bool, user: tuple[str, np.ndarray] | None = None) -> dict[str, Any]:
    """The whole suite: rows (:func:`compare`) on synthetic and user lengths, then the probes."""
    # The machine's load when the run starts, printed with the table: other work on the machine
    # slows every sampler, and ratios measured side by side stay the headline either way.
    load_note = f"load average {os.getloadavg()[0]:.2f} when it started"
    rows = []
    cache: dict[tuple[str, int], np.ndarray] = {}
    for name, n, ranks in QUICK_ROWS if quick else FULL_ROWS:
        lengths = cache.setdefault((name, n), synthetic_lengths(name, n))
        rows.append(compare(name, lengths, ranks))
    if user is not None:
        for ranks in USER_RANKS[:2] if quick else USER_RANKS:
            rows.append(compare(user[0], user[1], ranks))
    with tempfile.TemporaryDirectory(prefix="ddp-seq-scale-") as tmp:
        sizes, ranks = (QUICK_PROBES, 4) if quick else (FULL_PROBES, PROBE_RANKS)
        probes = [probe(n, ranks, Path(tmp)) for n in sizes]
    return {"suite": "scale", "quick": quick, "per_rank": PER_RANK, "rows": rows, "probes": probes,
            "load_note": load_note,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "complete": True}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 27's targets: an epoch within 2x of DistributedSampler + BatchSampler at 10M / 64 ranks and
    1M / 1,024 ranks (lognormal), the first share of 100M sequences under 10 s."""
    out = []
    for n, ranks in ((10_000_000, 64), (1_000_000, 1024)):
        row = next((r for r in result["rows"] if (r["lengths"], r["sequences"], r["ranks"]) ==
                    ("lognormal", n, ranks)), None)
        if row:
            ratio = row["epoch_vs_distributed"]
            out.append({"target": f"epoch of shares at {n:,} sequences / {ranks:,} ranks within 2x of "
                                  "DistributedSampler + BatchSampler",
                        "measured": f"{ratio:.2f}x ({row['ddp_seq']['epoch_s']:.2f} s vs "
                                    f"{row['distributed']['epoch_s']:.2f} s)", "met": "yes" if ratio <= 2 else "no"})
    for p in result["probes"]:
        if p["sequences"] == 100_000_000:
            out.append({"target": "first share at 100,000,000 sequences under 10 s",
                        "measured": f"{p['first_s']:.2f} s", "met": "yes" if p["first_s"] < 10 else "no"})
    return out


def _table(rows: list[list[str]], head: list[str]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def markdown(result: dict[str, Any], json_name: str) -> str:
    """The BENCHMARKS.md section of a scale result."""
    m = result["machine"]
    head = ["lengths", "sequences", "ranks", "ddp_seq first s", "ddp_seq epoch s", "ms/step", "× DS+BS",
            "× length-grouped", "DS+BS epoch s", "grouped epoch s", "padding eff. ddp_seq / DS+BS / grouped",
            "straggler ddp_seq / DS+BS / grouped", "all ranks' shares s"]
    rows = []
    for r in result["rows"]:
        d, s, g = r["ddp_seq"], r["distributed"], r["grouped"]
        rows.append([r["lengths"], f"{r['sequences']:,}", f"{r['ranks']:,}", f"{d['first_s']:.3f}",
                     f"{d['epoch_s']:.3f}", f"{d['per_step_ms']:.3f}", f"{r['epoch_vs_distributed']:.2f}",
                     f"{r['epoch_vs_grouped']:.2f}", f"{s['epoch_s']:.3f}", f"{g['epoch_s']:.3f}",
                     " / ".join(f"{x['padding_efficiency']:.3f}" for x in (d, s, g)),
                     " / ".join(f"{x['straggler_ratio']:.3f}" for x in (d, s, g)), f"{d['all_ranks_figures_s']:.3f}"])
    probes = [[f"{p['sequences']:,}", f"{p['ranks']}", f"{p['first_s']:.2f}", f"{p['epoch_s']:.1f}", f"{p['steps']:,}",
               p["lengths_dtype"] + (", memory-mapped" if p["mapped"] else ""), f"{p['rss_before_mb']:,.0f}",
               f"{p['peak_rss_mb']:,.0f}"] for p in result["probes"]]
    checks = targets(result)
    out = [f"## Sampler at scale (`ddp-seq bench --suite scale`, {m['date']}, `{m['host']}`)", "",
           f"{m['cores']} CPU cores, torch {m['torch']}, Python {m['python']}. One run, "
           f"{result.get('load_note', 'on a machine shared with other work')}: ratios measured side by side in one "
           f"run are the headline. Reproduce: `{result['command']}`. Raw result: "
           f"[`bench/results/{json_name}`](bench/results/{json_name}). How to read it: "
           "[docs/benchmarks.md](docs/benchmarks.md#the-sampler-at-scale---suite-scale).", ""]
    if checks:
        out += ["### Targets (issue 27)", "", _table([[c["target"], c["measured"], c["met"]] for c in checks],
                                                     ["target", "measured", "met"]), ""]
    out += ["### Rank 0's epoch of batches, and every rank's figures", "",
            f"Global batch {PER_RANK} x ranks (ddp_seq: bucket, pool 50, the defaults); the peers' batches are "
            f"{PER_RANK} per rank. Times are rank 0's; padding efficiency and straggler over every rank.", "",
            _table(rows, head), "",
            "### A fresh process per size: lengths memory-mapped from an int16 .npy, rank 0", "",
            _table(probes, ["sequences", "ranks", "first share s", "epoch s", "steps", "lengths",
                            "RSS after imports MiB", "peak RSS MiB"]), ""]
    return "\n".join(out)


def text(result: dict[str, Any]) -> str:
    """The targets as plain lines (the tables are in BENCHMARKS.md)."""
    return "\n".join(f"{c['target']}: {c['measured']} -- met: {c['met']}" for c in targets(result)) or "no targets"
