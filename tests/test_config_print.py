"""The printed config shows the keys that apply (issue 26, found with row 8): a file-data run printed
``num_classes: 4`` for 6-class data. ``check-config`` and a run's log leave out what nothing reads and
say so in a comment; ``config.yaml`` in the run directory keeps every key."""

from __future__ import annotations

import yaml

from ddp_seq.config import load_config, to_dict
from ddp_seq.config_text import dump_yaml, unused_keys

TSV = ["data.format=tsv", "data.train_path=t.tsv"]


def printed(overrides: list[str]) -> tuple[dict, str]:
    text = dump_yaml(load_config(None, overrides), used_only=True)
    return yaml.safe_load(text), text


def test_a_file_run_leaves_out_the_synthetic_keys_and_says_so():
    tree, text = printed([*TSV, "data.num_classes=6"])
    synthetic = {"num_train", "num_val", "features", "num_classes", "length_median", "length_sigma", "min_length",
                 "noise"}
    assert not synthetic & set(tree["data"]) and "num_classes" not in text.split("# not used")[0]
    assert {"train_path", "header", "tokenizer", "val_fraction", "seed"} <= set(tree["data"])
    assert not {"input_column", "target_column", "missing"} & set(tree["data"])  # parquet/hf, ts keys
    assert "  # not used (data.format=tsv, data.num_workers=0), left out: num_train, num_val, features, " \
           "num_classes," in text
    # Every key printed has the config's value; the stored form keeps every key.
    full = to_dict(load_config(None, [*TSV, "data.num_classes=6"]))
    assert all(full[s][k] == v for s, keys in tree.items() for k, v in keys.items())
    assert yaml.safe_load(dump_yaml(load_config(None, [*TSV, "data.num_classes=6"])))["data"]["num_classes"] == 6


def test_each_format_keeps_its_own_keys():
    assert "input_column" in printed(["data.format=parquet", "data.train_path=t.parquet"])[0]["data"]
    assert "missing" in printed(["data.format=ts", "data.train_path=t.ts"])[0]["data"]
    npz = printed(["data.format=npz", "data.train_path=t.npz"])[0]["data"]
    assert not {"tokenizer", "min_freq", "header"} & set(npz)
    assert "val_fraction" not in printed([*TSV, "data.val_path=v.tsv"])[0]["data"]


def test_the_synthetic_task_leaves_out_the_file_keys():
    tree, _ = printed([])
    assert "num_classes" in tree["data"] and not {"train_path", "tokenizer", "header", "truncate"} & set(tree["data"])
    assert unused_keys(load_config())["data"][0] == "data.format=synthetic, data.num_workers=0"


def test_optimizer_and_worker_keys_are_shown_where_they_apply():
    assert "momentum" not in printed([])[0]["training"]
    assert printed(["training.optimizer=sgd"])[0]["training"]["momentum"] == 0.9
    assert "prefetch_factor" not in printed([])[0]["data"]
    workers = printed(["data.num_workers=2"])[0]["data"]
    assert workers["prefetch_factor"] == 2 and workers["persistent_workers"] is True


def test_check_config_prints_the_keys_that_apply(capsys):
    from ddp_seq.cli import main

    assert main(["check-config", *TSV]) == 0
    out = capsys.readouterr().out
    assert "num_classes" not in out.split("# not used")[0] and "train_path: t.tsv" in out
