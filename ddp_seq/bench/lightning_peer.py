"""The same task trained with PyTorch Lightning DDP: the peer ddp_seq is measured against.

Run under torchrun (one process per rank, as ddp_seq is); Lightning sees torchrun's environment
and joins its processes instead of spawning its own. Two setups:

- ``default``: what a Lightning user writes -- a ``DataLoader(shuffle=True)`` that Lightning gives
  a ``DistributedSampler``, per-rank batches of ``batch_size / world_size``, the pad collate and
  the packing model of :mod:`.reference`.
- ``tuned``: Lightning given ddp_seq's pieces -- its sharded bucket sampler (equal-cost shares of
  the same global batches), its collate, :class:`~ddp_seq.nn.seq_model.SeqModel` on the padded path, and
  its process settings (threads, denormals flushed) -- so the only difference left to ddp_seq's
  own loop is the framework around it.

Epoch records are written by rank 0 to ``--out`` in ddp_seq's ``metrics.jsonl`` shape.
Needs ``pytorch-lightning`` (``pip install -e .[bench]``); ddp_seq itself never imports it.

    torchrun --nproc_per_node=2 -m ddp_seq.bench.lightning_peer --setup default --out m.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ddp_seq.bench.reference import PackedLSTM, SequenceDataset, loss_and_hits, pad_collate
from ddp_seq.builders import seq_model_kwargs
from ddp_seq.config import Config, load_config
from ddp_seq.data.readers.synthetic import make_synthetic, num_outputs
from ddp_seq.nn.seq_model import SeqModel
from ddp_seq.parallel.process_group import DistInfo, all_reduce_sum, env_int, peak_rss_mb, per_rank, usable_cores
from ddp_seq.train import objective
from ddp_seq.train.loaders import make_loader, make_sampler


def build(cfg: Config, setup: str, out: Path):
    """The LightningModule, its train/val loaders and the timing callback for ``setup``."""
    import pytorch_lightning as pl

    rank, world = env_int("RANK", 0), env_int("WORLD_SIZE", 1)
    # Lightning joins the gloo group in fit(), before any callback below reduces over it.
    info = DistInfo(rank, env_int("LOCAL_RANK", 0), world, env_int("LOCAL_WORLD_SIZE", world),
                    torch.device("cpu"), "gloo" if world > 1 else None)
    train_data, val_data = make_synthetic(cfg.data, "train"), make_synthetic(cfg.data, "val")
    task, t = cfg.data.task, cfg.training
    if setup == "default":
        model = PackedLSTM(train_data.values.shape[1], num_outputs(cfg.data), train_data.per_step,
                           cfg.model.embedding_dim, cfg.model.hidden, cfg.model.layers)
        train_set = SequenceDataset(train_data.values, train_data.offsets, train_data.targets, train_data.per_step)
        val_set = SequenceDataset(val_data.values, val_data.offsets, val_data.targets, val_data.per_step)
        rank_batch = max(1, cfg.batching.batch_size // world)
        train_loader = DataLoader(train_set, batch_size=rank_batch, shuffle=True, collate_fn=pad_collate)
        val_loader = DataLoader(val_set, batch_size=max(1, cfg.batching.eval_batch_size // world),
                                collate_fn=pad_collate)
    else:
        model = SeqModel(task, train_data.values.shape[1], num_outputs(cfg.data), **seq_model_kwargs(cfg.model),
                         execution="padded")
        # ddp_seq's public sampler and loader, as the trainer builds them; Lightning calls set_epoch.
        train_loader = make_loader(train_data, make_sampler(train_data, cfg, info, train=True), cfg)
        val_loader = make_loader(val_data, make_sampler(val_data, cfg, info, train=False), cfg)
    total_steps = t.epochs * len(train_loader)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.val_sums = [0.0, 0.0, 0.0]

        def _split(self, batch):
            if setup == "default":
                return batch
            return batch.inputs, batch.lengths, batch.targets

        def training_step(self, batch, _):
            inputs, lengths, targets = self._split(batch)
            outputs = self.model(inputs, lengths)
            if setup == "default":
                return loss_and_hits(outputs, targets)[0]
            # ddp_seq's normalisation: the global batch's mean (DDP averages gradients over ranks).
            return objective.loss_sum(task, outputs, batch) / objective.global_count(task, batch) * world

        def validation_step(self, batch, _):
            inputs, lengths, targets = self._split(batch)
            outputs = self.model(inputs, lengths)
            if setup == "default":
                loss, hits, count = loss_and_hits(outputs, targets)
                sums = [float(loss) * count, hits, count]
            else:
                sums = objective.metric_sums(task, outputs, batch).tolist()
            self.val_sums = [a + b for a, b in zip(self.val_sums, sums)]

        def configure_optimizers(self):
            from ddp_seq.train.optim import build_optimizer, build_scheduler

            optimizer = build_optimizer(self.parameters(), cfg)
            scheduler = build_scheduler(optimizer, cfg, total_steps)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    class EpochRecords(pl.Callback):
        """Training time, tokens and padding of each epoch; val metrics over every rank."""

        def on_train_epoch_start(self, trainer, module):
            self.start = self.last = time.perf_counter()
            self.real = self.padded = 0
            self.step_costs: list[int] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            inputs, lengths, _ = module._split(batch)
            # Real steps only: a tuned batch may carry a zero-weighted filler sample.
            self.real += int(lengths.sum()) if setup == "default" else batch.real_tokens
            self.padded += inputs.shape[0] * inputs.shape[1]
            self.step_costs.append(inputs.shape[0] * inputs.shape[1])
            self.last = time.perf_counter()

        def on_validation_epoch_start(self, trainer, module):
            module.val_sums = [0.0, 0.0, 0.0]

        def on_train_epoch_end(self, trainer, module):
            real, padded = all_reduce_sum(torch.tensor([self.real, self.padded]), info).tolist()
            # Per step, the slowest rank's padded cost over the mean cost (ranks run equal step counts).
            costs = torch.tensor(per_rank(self.step_costs, info)).reshape(world, -1)
            straggler = float(costs.max(0).values.sum() / costs.mean(0).sum()) if costs.numel() else 1.0
            seconds = max(per_rank(self.last - self.start, info))
            rss = per_rank(peak_rss_mb(), info)
            # Default setup: DistributedSampler pads the val set to a multiple of the world size by
            # repeating samples; the default sizes divide evenly, so every sample counts once.
            loss, hits, count = all_reduce_sum(torch.tensor(module.val_sums), info).tolist()
            if rank == 0:
                record = {"kind": "epoch", "epoch": trainer.current_epoch + 1, "train_s": seconds,
                          "seq_per_s": len(train_data) / seconds, "tokens_per_s": real / seconds,
                          "padding_efficiency": real / padded, "straggler_ratio": straggler,
                          "peak_rss_mb": rss, "val_loss": loss / count, "val_accuracy": hits / count}
                with out.open("a") as log:
                    log.write(json.dumps(record) + "\n")
                print(f"epoch {record['epoch']}: {record['tokens_per_s']:,.0f} tok/s, "
                      f"val_accuracy {record['val_accuracy']:.4f}", flush=True)

    return Module(), train_loader, val_loader, EpochRecords()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ddp_seq.bench.lightning_peer", description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=("default", "tuned"), default="default")
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    import pytorch_lightning as pl

    world, local_world = env_int("WORLD_SIZE", 1), env_int("LOCAL_WORLD_SIZE", 1)
    # The thread rule ddp_seq applies (Lightning sets none): the cores shared among local ranks.
    torch.set_num_threads(cfg.distributed.threads_per_rank or max(1, usable_cores() // local_world))
    if args.setup == "tuned":  # ddp_seq's process settings too, so only the framework differs
        torch.set_flush_denormal(cfg.distributed.flush_denormal)
    pl.seed_everything(cfg.training.seed, verbose=False)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    module, train_loader, val_loader, records = build(cfg, args.setup, out)
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto",
                         max_epochs=cfg.training.epochs, gradient_clip_val=cfg.training.grad_clip or None,
                         use_distributed_sampler=args.setup == "default", callbacks=[records], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(module, train_loader, val_loader)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from ddp_seq.parallel.process_group import exit_worker

    code = main()
    exit_worker(code)  # skips the gloo abort at interpreter exit that torch 2.13 sometimes hits
    sys.exit(code)
