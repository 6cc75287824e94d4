"""The hand-written baseline every benchmark ratio is taken against.

This is the loop a practitioner writes for variable-length sequences without a framework: a
``DataLoader`` with shuffled (random) batches, a collate function that pads each batch, a model
that packs the padded batch in ``forward`` (``pack_padded_sequence``), one process using every
core. Only the data comes from ddp_seq (the same synthetic task, same seed, same split); the
model, loss and loop are plain torch, written as the PyTorch tutorials teach them. With a CUDA
GPU it trains there (cuDNN runs the packed LSTM; lengths stay on the CPU, as packing needs), as a
practitioner would: ``.to(device)`` per batch, ``loss.item()`` per step.

It matches ddp_seq's model and recipe where they are not what is being measured: the same layers
created in the same order (so the same seed gives the same initial weights), Adam at the same
learning rate, the same warmup + cosine schedule written out by hand, gradient clipping at 1.0.
It writes ``metrics.jsonl`` records shaped like ddp_seq's, so the suite summarises both alike.

    python -m ddp_seq.bench.reference --out runs/reference/metrics.jsonl data.num_train=2000
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence
from torch.utils.data import DataLoader, Dataset

IGNORE = -100  # target at padded steps of a tag batch


class SequenceDataset(Dataset):
    """One (steps [T, F], target) pair per sample; the target is a label, or one label per step."""

    def __init__(self, values, offsets, targets, per_step: bool):
        self.values, self.offsets, self.targets, self.per_step = values, offsets, targets, per_step

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int):
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        x = torch.from_numpy(self.values[start:end])
        y = torch.from_numpy(self.targets[start:end]) if self.per_step else torch.tensor(int(self.targets[i]))
        return x, y


def pad_collate(samples):
    """Pad the batch to its longest sequence; lengths travel as a 1-D tensor."""
    xs, ys = zip(*samples)
    lengths = torch.tensor([len(x) for x in xs])
    inputs = pad_sequence(xs, batch_first=True)
    targets = pad_sequence(ys, batch_first=True, padding_value=IGNORE) if ys[0].dim() else torch.stack(ys)
    return inputs, lengths, targets


class PackedLSTM(nn.Module):
    """Linear input layer, stacked LSTM run on a PackedSequence, linear head."""

    def __init__(self, num_inputs: int, num_outputs: int, per_step: bool, embedding_dim: int = 64,
                 hidden: int = 128, layers: int = 2):
        super().__init__()
        self.per_step = per_step
        self.input_layer = nn.Linear(num_inputs, embedding_dim)
        self.rnn = nn.LSTM(embedding_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_outputs)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.input_layer(inputs), lengths.cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, (h_n, _) = self.rnn(packed)
        if self.per_step:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.shape[1])
            return self.head(out)  # [B, T, C]
        return self.head(h_n[-1])  # the top layer's state at each sequence's last step


def loss_and_hits(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over samples (or real steps), correct predictions, and their count."""
    if logits.dim() == 3:
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE)
        valid = targets != IGNORE
        return loss, int(((logits.argmax(-1) == targets) & valid).sum()), int(valid.sum())
    loss = nn.functional.cross_entropy(logits, targets)
    return loss, int((logits.argmax(-1) == targets).sum()), len(targets)


def train(cfg, out: Path) -> None:
    """Train for ``cfg.training.epochs`` epochs, evaluating after each; append records to ``out``."""
    from ddp_seq.data.readers.synthetic import make_synthetic, num_outputs
    from ddp_seq.parallel.process_group import peak_rss_mb

    torch.manual_seed(cfg.training.seed)
    if cfg.distributed.threads_per_rank:
        torch.set_num_threads(cfg.distributed.threads_per_rank)
    train_data, val_data = make_synthetic(cfg.data, "train"), make_synthetic(cfg.data, "val")
    per_step = train_data.per_step
    train_set = SequenceDataset(train_data.values, train_data.offsets, train_data.targets, per_step)
    val_set = SequenceDataset(val_data.values, val_data.offsets, val_data.targets, per_step)
    loader = DataLoader(train_set, batch_size=cfg.batching.batch_size, shuffle=True, collate_fn=pad_collate,
                        generator=torch.Generator().manual_seed(cfg.training.seed))
    val_loader = DataLoader(val_set, batch_size=cfg.batching.eval_batch_size, collate_fn=pad_collate)

    m = cfg.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # Created on the CPU, then moved: the same seed gives ddp_seq's initial weights on any device.
    model = PackedLSTM(train_data.values.shape[1], num_outputs(cfg.data), per_step, m.embedding_dim, m.hidden,
                       m.layers).to(device)
    t = cfg.training
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr)
    total_steps = t.epochs * len(loader)

    def lr_factor(step: int) -> float:  # linear warmup, then cosine decay to min_lr_ratio
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    with out.open("a") as log:
        for epoch in range(t.epochs):
            model.train()
            real = padded = 0
            loss_sum = 0.0
            start = time.perf_counter()
            for inputs, lengths, targets in loader:
                inputs, targets = inputs.to(device), targets.to(device)
                loss, _, _ = loss_and_hits(model(inputs, lengths), targets)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(lengths)
                real, padded = real + int(lengths.sum()), padded + inputs.shape[0] * inputs.shape[1]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            model.eval()
            val_loss = hits = count = 0
            with torch.no_grad():
                for inputs, lengths, targets in val_loader:
                    inputs, targets = inputs.to(device), targets.to(device)
                    loss, batch_hits, batch_count = loss_and_hits(model(inputs, lengths), targets)
                    val_loss, hits, count = val_loss + float(loss) * batch_count, hits + batch_hits, count + batch_count
            record = {"kind": "epoch", "epoch": epoch + 1, "train_loss": loss_sum / len(train_set),
                      "train_s": seconds, "seq_per_s": len(train_set) / seconds, "tokens_per_s": real / seconds,
                      "padding_efficiency": real / padded, "straggler_ratio": 1.0,
                      "peak_rss_mb": [peak_rss_mb()], "val_loss": val_loss / count, "val_accuracy": hits / count}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(f"epoch {epoch + 1}: {record['tokens_per_s']:,.0f} tok/s, val_accuracy {hits / count:.4f}",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    from ddp_seq.config import load_config

    parser = argparse.ArgumentParser(prog="python -m ddp_seq.bench.reference", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="a ddp_seq YAML config (data, model size, recipe)")
    parser.add_argument("--out", required=True, help="metrics.jsonl to append epoch records to")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg.data.format != "synthetic" or cfg.data.task == "regress" or cfg.model.cell != "lstm" \
            or cfg.model.bidirectional or cfg.model.pooling != "last":
        print("reference: only the synthetic classify/tag tasks with a unidirectional LSTM (last-step pooling)",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    train(cfg, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
