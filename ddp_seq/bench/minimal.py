"""The floor under ddp_seq's step: a minimal hand-written loop over the same shares and network.

The short-sequence rows of the benchmark ask how much of a step is ddp_seq's own and how much is
the computation plus the gradient all-reduce that any data-parallel job pays. This loop has
nothing but those: ddp_seq's sampler and collate (the same shares of the same global batches),
the default network written on the public :class:`~ddp_seq.nn.rnn.PackedLSTM`, Adam with the same
warmup + cosine schedule and clipping, and -- by ``--sync`` -- either no gradient synchronisation
at all (``none``: the computation alone; each rank's weights drift apart, so its metric means
nothing), PyTorch's ``DistributedDataParallel`` with every step under ``no_sync`` (``nosync``: what
DDP costs besides the all-reduce), or plain DDP (``ddp``), optionally with its knobs
(``--static-graph``, ``--bucket-view``, ``--bucket-cap-mb``). No logging, no SIGTERM checks, no
token counters: one collective per step (DDP's), no more.

    torchrun --nproc_per_node=2 -m ddp_seq.bench.minimal --sync ddp --out m.jsonl data.length_median=8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn


def train(cfg, out: Path, sync: str, ddp_kwargs: dict) -> None:
    """Train ``cfg.training.epochs`` epochs of ``cfg``'s synthetic task; append epoch records to ``out``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ddp_seq.bench.user_model import UserLSTM
    from ddp_seq.builders import build_data
    from ddp_seq.data.sampler import straggler_ratio
    from ddp_seq.parallel.process_group import distributed, peak_rss_mb, per_rank
    from ddp_seq.train.evaluation import evaluate
    from ddp_seq.train.loaders import make_loader, make_sampler
    from ddp_seq.train.objective import TaskObjective
    from ddp_seq.train.optim import build_scheduler

    with distributed(cfg.distributed) as info:
        torch.manual_seed(cfg.training.seed)
        data = build_data(cfg)
        m = cfg.model
        module = UserLSTM(data.num_inputs, data.num_outputs, m.embedding_dim, m.hidden, m.layers).to(info.device)
        gpu = info.device.type == "cuda"
        if gpu:
            ddp_kwargs = {**ddp_kwargs, "device_ids": [info.device]}
        model = DDP(module, **ddp_kwargs) if sync in ("ddp", "nosync") and info.distributed else module
        skip_sync = model.no_sync if sync == "nosync" and info.distributed else contextlib.nullcontext
        sampler = make_sampler(data.train, cfg, info, train=True)
        loader = make_loader(data.train, sampler, cfg)
        objective = TaskObjective(cfg.data.task)
        t = cfg.training
        optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
        total = 0
        for epoch in range(t.epochs):
            sampler.set_epoch(epoch)
            total += len(sampler)
        scheduler = build_scheduler(optimizer, cfg, total)
        log = out.open("a") if info.is_main else None
        for epoch in range(t.epochs):
            sampler.set_epoch(epoch)
            model.train()
            real = padded = 0
            start = time.perf_counter()
            for batch in loader:
                real += batch.real_tokens  # counted on the CPU copy: no device sync per step
                padded += batch.padded_tokens
                batch = batch.to(info.device)
                # The global mean: this rank's loss sum times W / N; DDP averages over the W ranks.
                with skip_sync():
                    loss_sum, _ = objective.loss(model(batch.inputs, batch.model_lengths), batch)
                    optimizer.zero_grad(set_to_none=True)
                    (loss_sum * (info.world_size / batch.global_count)).backward()
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                scheduler.step()
            if gpu:
                torch.cuda.synchronize(info.device)
            seconds = time.perf_counter() - start
            # The run's figures, reduced once per epoch (not per step).
            tokens = per_rank([float(real), float(padded), seconds], info)
            metrics = evaluate(module, data.val, cfg, info, objective)
            rss = per_rank(peak_rss_mb(), info)
            slowest = max(r[2] for r in tokens)
            total_real = sum(r[0] for r in tokens)
            record = {"kind": "epoch", "epoch": epoch + 1, "train_s": slowest,
                      "seq_per_s": len(sampler.lengths) / slowest, "tokens_per_s": total_real / slowest,
                      "padding_efficiency": total_real / max(1.0, sum(r[1] for r in tokens)),
                      "straggler_ratio": straggler_ratio(sampler.batches(), sampler.lengths, info.world_size),
                      "peak_rss_mb": rss, **{f"val_{k}": v for k, v in metrics.items()}}
            if log:
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(f"epoch {epoch + 1}: {record['tokens_per_s']:,.0f} tok/s, {slowest:.2f}s", flush=True)
        if log:
            log.close()


def main(argv: list[str] | None = None) -> int:
    from ddp_seq.config import load_config

    parser = argparse.ArgumentParser(prog="python -m ddp_seq.bench.minimal", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a ddp_seq YAML config (data, model size, recipe)")
    parser.add_argument("--out", required=True, help="metrics.jsonl to append epoch records to")
    parser.add_argument("--sync", choices=("none", "nosync", "ddp"), default="ddp")
    parser.add_argument("--static-graph", action="store_true", help="DDP(static_graph=True)")
    parser.add_argument("--bucket-view", action="store_true", help="DDP(gradient_as_bucket_view=True)")
    parser.add_argument("--bucket-cap-mb", type=float, default=None, help="DDP(bucket_cap_mb=...)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.data.format != "synthetic" or cfg.data.task != "classify":
        print("minimal: only the synthetic classify task", file=sys.stderr)
        return 2
    ddp_kwargs = {"static_graph": args.static_graph, "gradient_as_bucket_view": args.bucket_view}
    if args.bucket_cap_mb is not None:
        ddp_kwargs["bucket_cap_mb"] = args.bucket_cap_mb
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    train(cfg, out, args.sync, ddp_kwargs)
    from ddp_seq.parallel.process_group import exit_worker

    exit_worker(0)  # skips the gloo abort at interpreter exit that torch 2.13 workers sometimes hit
    return 0


if __name__ == "__main__":
    sys.exit(main())
