"""``ddp-seq plan --config FILE [section.key=value ...] --world-size N``: what a job's batching will
do per epoch on N ranks, before a cluster is booked -- steps, sequences and padded tokens per step on
each rank, padding efficiency, straggler ratio, the costliest share (what sizes a rank's memory), and
what a smaller or larger ``batching.batch_size`` / ``batching.max_tokens`` would change.

It reads only the training lengths (see :func:`training_lengths`), plans the epoch with the sampler's
own vectorised plan (:func:`ddp_seq.data.cuts.plan_epoch`, the batches ``global_batches`` gives) and
its share figures (:func:`~ddp_seq.data.sampler.share_costs`, the shares ``split_shares`` gives) --
the plan every rank of the job will follow -- and starts no process group: one process simulates
every rank. Bad input is one line and exit code 2, as for every command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from ddp_seq.config import Config, load_config
from ddp_seq.data import cuts
from ddp_seq.data.sampler import compact_lengths, lengths_of, share_costs
from ddp_seq.errors import UserError, first_line

#: Share figures computed per block of batches: steps x ranks cells (16 bytes each) held at a time.
CELLS = 1 << 22

#: Keys of the epoch plan that ``batching`` (and ``training.seed``) set; the sampler's own names.
PLAN_KEYS = ("batch_size", "max_tokens", "strategy", "pool", "padding_noise")


@dataclass
class EpochPlan:
    """One epoch of a job on ``world_size`` ranks, in the terms of its epoch record.

    A *rank-step* is one rank's part of one step (``steps x world_size`` of them). Tokens are time
    steps of sequences; *padded* tokens are what a rank computes (share size x its longest sequence).
    """

    world_size: int
    epoch: int
    steps: int  # global batches = steps on every rank
    sequences: int  # training sequences in the epoch (each once)
    real_tokens: int
    padded_tokens: int  # over all ranks, filler rank-steps included (as the epoch record counts them)
    sequences_per_step_mean: float  # real sequences per rank-step
    sequences_per_step_max: int
    padded_per_step_mean: float  # padded tokens per rank-step, fillers included
    padded_per_step_max: int  # the largest share's padded tokens: what sizes a rank's activation memory
    largest_share: tuple[int, int]  # (sequences, longest length) of that share
    filler_steps: int  # rank-steps whose share is empty (the rank runs one sequence at weight 0)
    padding_efficiency: float  # real_tokens / padded_tokens
    straggler_ratio: float  # sum over steps of the costliest share / of the mean share (1.0: balanced)


def epoch_figures(lengths: np.ndarray, world_size: int, *, epoch: int = 0, batch_size: int, max_tokens: int = 0,
                  strategy: str = "bucket", pool: int = 50, padding_noise: float = 0.0, seed: int = 0) -> EpochPlan:
    """The figures of epoch ``epoch`` of ``BucketBatchSampler(lengths, ...)`` on ``world_size`` ranks.

    ``lengths``: ``[N]`` ints >= 1 of any integer dtype (the training sequences' lengths). The
    epoch's batches come from the sampler's vectorised plan and every rank's share figures from
    :func:`~ddp_seq.data.sampler.share_costs`, a block of batches at a time, so memory stays
    O(N + CELLS) whatever the steps x ranks (a job of small batches on many ranks has billions).
    """
    batches = cuts.plan_epoch(lengths, batch_size=batch_size, max_tokens=max_tokens, strategy=strategy, pool=pool,
                              padding_noise=padding_noise, seed=seed, epoch=epoch).batches()
    seq_max = padded_max = fillers = filler_tokens = slowest_sum = cost_sum = 0
    largest = (0, 0)
    block = max(1, CELLS // world_size)
    for start in range(0, len(batches), block):
        part = batches[start:start + block]
        sizes, padded = share_costs(part, lengths, world_size)  # [batches, ranks] int64 each
        k, r = np.unravel_index(int(np.argmax(padded)), padded.shape)
        if padded[k, r] > padded_max:
            padded_max, largest = int(padded[k, r]), (int(sizes[k, r]), int(padded[k, r] // sizes[k, r]))
        seq_max = max(seq_max, int(sizes.max()))
        slowest_sum += int(padded.max(axis=1).sum())
        cost_sum += int(padded.sum())
        # A rank whose share is empty runs the batch's first sample at weight 0 (the sampler's filler).
        empty = (sizes == 0).sum(axis=1)
        fillers += int(empty.sum())
        if empty.any():
            firsts = lengths[np.fromiter((b[0] for b in part), dtype=np.int64, count=len(part))]
            filler_tokens += int((empty * firsts.astype(np.int64)).sum())
    real = int(np.sum(lengths, dtype=np.int64))
    rank_steps = max(len(batches) * world_size, 1)
    padded = cost_sum + filler_tokens
    return EpochPlan(world_size, epoch, len(batches), len(lengths), real, padded, len(lengths) / rank_steps, seq_max,
                     padded / rank_steps, padded_max, largest, fillers, real / max(padded, 1),
                     world_size * slowest_sum / cost_sum if cost_sum else 1.0)


def sampler_options(cfg: Config) -> dict:
    """The training sampler's plan options of ``cfg``, as ``ddp_seq.train.loaders.make_sampler`` sets them."""
    b = cfg.batching
    return {"batch_size": b.batch_size, "max_tokens": b.max_tokens, "strategy": b.strategy, "pool": b.pool,
            "padding_noise": b.padding_noise, "seed": cfg.training.seed}


def variants(options: dict) -> list[tuple[str, dict]]:
    """The settings compared with ``options``: ``batch_size`` halved and doubled and, when a token
    budget is set, ``max_tokens`` halved and doubled. ``(label, options)`` pairs, ``options`` first."""
    rows = [("this config", options)]
    for key in ("batch_size", "max_tokens"):
        value = options[key]
        if value <= 0:
            continue  # max_tokens 0 is "no budget": nothing to halve
        for other in (max(1, value // 2), value * 2):
            if other != value:
                rows.append((f"batching.{key}={other}", {**options, key: other}))
    return rows


def training_lengths(cfg: Config) -> tuple[np.ndarray, str]:
    """The lengths ``[N]`` of the sequences the job trains on, and where they come from (for the output).

    Built-in data: :func:`~ddp_seq.data.readers.sources.training_lengths` (synthetic lengths drawn
    without their steps; a file parsed, nothing encoded). ``data.target``: the user's function is
    called and its training dataset's ``lengths`` attribute read (else one pass over its items:
    the only way to a plain Dataset's lengths). With ``data.folds`` the plan is fold 1's training part.
    """
    fold = 0 if cfg.data.folds else None
    what = " (fold 1's training part)" if cfg.data.folds else ""
    if not cfg.data.target:
        from ddp_seq.data.readers.sources import training_lengths as built_in

        source = cfg.data.train_path or "the synthetic training set"
        return built_in(cfg.data, fold), source + what
    from ddp_seq.builders import build_data

    train = build_data(cfg).train
    try:
        lengths = lengths_of(train)
    except ValueError as e:
        raise UserError(f"data.target: the training dataset: {first_line(e)}") from None
    if fold is not None:
        lengths = lengths[_target_fold_train(cfg, train)]
    return lengths, cfg.data.target + what


def _target_fold_train(cfg: Config, train) -> np.ndarray:
    """Indices of fold 1's training part of a ``data.target`` dataset, as ``cross_validate`` splits it."""
    from ddp_seq.data.folds import fold_assignment
    from ddp_seq.train.contract import item_targets

    strata = None
    if cfg.data.task == "classify":
        targets, per_item = item_targets(train)
        strata = targets if per_item else None
    try:
        return np.flatnonzero(fold_assignment(len(train), cfg.data.folds, cfg.data.seed, strata) != 0)
    except ValueError as e:
        raise UserError(f"data.folds: {first_line(e)}") from None


def plan(cfg: Config, world_size: int, epoch: int = 0) -> dict:
    """Everything ``ddp-seq plan`` prints, as a JSON-ready dict: the data, the options, this
    config's :class:`EpochPlan` and one per :func:`variants` row (``seconds``: the planning time)."""
    started = time.perf_counter()
    lengths, source = training_lengths(cfg)
    lengths = compact_lengths(lengths)  # 1-2 bytes a sequence instead of 8: 100M sequences fit easily
    read_s = time.perf_counter() - started
    options = sampler_options(cfg)
    rows = [{"setting": label, **asdict(epoch_figures(lengths, world_size, epoch=epoch, **opts))}
            for label, opts in variants(options)]
    return {"source": source, "sequences": len(lengths), "min_length": int(lengths.min()),
            "median_length": float(np.median(lengths)), "max_length": int(lengths.max()),
            "world_size": world_size, "epoch": epoch, "grad_accum": cfg.training.grad_accum, "options": options,
            "plan": rows[0], "variants": rows[1:], "read_s": round(read_s, 3),
            "seconds": round(time.perf_counter() - started, 3)}


def _n(x: float) -> str:
    """A count for the table: whole numbers as they are, small means with 2 decimals (0.06 of a sequence)."""
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:.2f}" if x < 10 else f"{x:,.1f}"


def render(result: dict) -> str:
    """The text ``ddp-seq plan`` prints for :func:`plan`'s ``result``."""
    p, o, w = result["plan"], result["options"], result["world_size"]
    accum = result["grad_accum"]
    optimizer = f"; {-(-p['steps'] // accum):,} optimizer steps (training.grad_accum={accum})" if accum > 1 else ""
    seqs, longest = p["largest_share"]
    lines = [
        f"data: {result['sequences']:,} training sequences from {result['source']}, {p['real_tokens']:,} tokens; "
        f"lengths {result['min_length']}-{result['max_length']}, median {result['median_length']:g}",
        "batching: " + " ".join(f"{k}={o[k]}" for k in PLAN_KEYS) + f", training.seed={o['seed']}",
        f"epoch {result['epoch']} on {w} rank{'s' if w > 1 else ''} (one process plans every rank's shares):",
        f"  steps per epoch              {p['steps']:,}, the same on every rank (one per global batch){optimizer}",
        f"  sequences per step per rank  mean {_n(p['sequences_per_step_mean'])}, max {p['sequences_per_step_max']:,}",
        f"  padded tokens per step/rank  mean {_n(p['padded_per_step_mean'])}, max {p['padded_per_step_max']:,}",
        f"  largest share                {p['padded_per_step_max']:,} padded tokens = {seqs:,} sequences x "
        f"{longest:,} steps (what sizes a rank's activation memory)",
        f"  padding efficiency           {p['padding_efficiency']:.3f} (real / padded tokens, as the epoch record)",
        f"  straggler ratio              {p['straggler_ratio']:.3f} (sum over steps of the costliest share's "
        "padded tokens / the mean share's; 1 = balanced)",
        f"  filler rank-steps            {p['filler_steps']:,} of {p['steps'] * w:,} (an empty share: the rank "
        "runs one sequence at weight 0)",
        "",
    ]
    header = ("setting", "steps", "seq/step/rank", "padded/step/rank", "largest share", "padding eff", "straggler",
              "fillers")
    table = [header] + [(r["setting"], f"{r['steps']:,}", _n(r["sequences_per_step_mean"]),
                         _n(r["padded_per_step_mean"]), f"{r['padded_per_step_max']:,}",
                         f"{r['padding_efficiency']:.3f}", f"{r['straggler_ratio']:.3f}", f"{r['filler_steps']:,}")
                        for r in [{**p, "setting": "this config"}, *result["variants"]]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    lines.append(f"planned in {result['seconds']:.2f} s ({result['read_s']:.2f} s reading the lengths)")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a :class:`UserError` (one line, exit 2), not usage text plus a line."""

    def error(self, message: str):
        raise UserError(f"plan: {message} (usage: ddp-seq plan [--config FILE] --world-size N "
                        "[section.key=value ...] [--epoch E] [--json])")


def main(argv: list[str] | None = None) -> int:
    """``ddp-seq plan``: print the plan (or ``--json``); 2 with one line on bad input."""
    parser = _Parser(prog="ddp-seq plan", description="what the config's batching does per epoch on N ranks: "
                     "steps, sequences and padded tokens per step per rank, padding efficiency, straggler ratio, "
                     "the largest share; and what other batch sizes / token budgets would change")
    parser.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    parser.add_argument("--world-size", required=True, type=int, help="ranks of the job (all nodes)")
    parser.add_argument("--epoch", type=int, default=0, help="the epoch to plan (0-based; default 0)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        if args.world_size < 1:
            raise UserError(f"plan: --world-size must be >= 1; got {args.world_size}")
        if args.epoch < 0:
            raise UserError(f"plan: --epoch must be >= 0; got {args.epoch}")
        result = plan(load_config(args.config, args.overrides), args.world_size, args.epoch)
    except UserError as e:
        print(f"ddp-seq: error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        print(json.dumps(result) if args.json else render(result), flush=True)
    except BrokenPipeError:  # `ddp-seq plan ... | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own recipe
    return 0


__all__ = ["EpochPlan", "main", "plan", "epoch_figures", "render", "training_lengths", "variants"]
