"""Every example config in ``configs/`` trains on its generated sample files and beats its baseline.

The sample files come from ``ddp-seq make-data samples`` (what ``make samples`` runs), written to a
temporary directory; the configs' ``data/samples/...`` paths are pointed there. Each run is the
config as shipped (same model, same epochs), in one process.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers import REPO

from ddp_seq.cli import main
from ddp_seq.config import load_config
from ddp_seq.data.readers.corpus import write_samples

SAMPLE_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml")
                        if "data/samples/" in p.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("samples")
    write_samples(out)
    return out


def test_there_is_an_example_per_file_format():
    formats = {load_config(str(REPO / "configs" / name)).data.format for name in SAMPLE_CONFIGS}
    assert formats == {"tsv", "jsonl", "npz", "ts"}
    corpus = load_config(str(REPO / "configs" / "stdlib-lines.yaml")).data
    assert (corpus.format, corpus.train_path) == ("tsv", "data/stdlib/stdlib-train.tsv")


@pytest.mark.parametrize("name", SAMPLE_CONFIGS)
def test_example_config_learns_its_sample_data(name, samples, tmp_path, capsys):
    cfg = load_config(str(REPO / "configs" / name)).data
    paths = [f"data.{key}={getattr(cfg, key).replace('data/samples', str(samples))}"
             for key in ("train_path", "val_path") if getattr(cfg, key)]
    assert main(["train", "--config", str(REPO / "configs" / name), *paths, f"logging.root={tmp_path}",
                 "logging.name=run", "logging.progress=none"]) == 0
    out = capsys.readouterr().out
    baselines = [float(b) for b in re.findall(r"majority-class baseline: .* scores val accuracy ([\d.]+)", out)]
    assert baselines, out
    if cfg.folds:
        result = json.loads((tmp_path / "run" / "folds.json").read_text())
        assert len(result["folds"]) == cfg.folds
        accuracy = result["mean"]["val_accuracy"]
    else:
        records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        accuracy = max(r["val_accuracy"] for r in records if r["kind"] == "epoch")
    assert accuracy > max(baselines) + 0.2, f"{name}: val accuracy {accuracy} vs baseline {max(baselines)}"
