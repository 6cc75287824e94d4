"""load_config: precedence, types, validation, messages that name the key; the CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import shutil
import typing
from pathlib import Path

import pytest
import yaml
from helpers import PYTHON, REPO, python, run

from ddp_seq.config import (
    BatchingConfig,
    CheckpointConfig,
    Config,
    ConfigError,
    DataConfig,
    DistributedConfig,
    LoggingConfig,
    ModelConfig,
    TrainingConfig,
    UserError,
    WandbConfig,
    choices_of,
    from_dict,
    load_config,
    to_dict,
    validate,
)
from ddp_seq.config_text import dump_yaml, reference_markdown

SECTIONS = {"data": DataConfig, "batching": BatchingConfig, "model": ModelConfig, "training": TrainingConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig, "wandb": WandbConfig,
            "distributed": DistributedConfig}


def all_keys() -> list[str]:
    cfg = Config()
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- precedence and types -----------------------------------------------------------------------

def test_defaults_then_yaml_then_overrides(tmp_path):
    default = Config()
    path = write(tmp_path, "model:\n  hidden: 32\n  cell: gru\ntraining:\n  lr: 0.05\n")
    from_file = load_config(str(path))
    assert (from_file.model.hidden, from_file.model.cell, from_file.training.lr) == (32, "gru", 0.05)
    assert from_file.training.epochs == default.training.epochs  # untouched key keeps its default
    both = load_config(str(path), ["model.hidden=8", "training.epochs=3"])
    assert (both.model.hidden, both.model.cell, both.training.lr, both.training.epochs) == (8, "gru", 0.05, 3)
    only_overrides = load_config(None, ["model.hidden=8"])
    assert only_overrides.model.hidden == 8 and only_overrides.model.cell == default.model.cell
    assert load_config() == Config()


def test_scientific_notation_strings_are_floats(tmp_path):
    path = write(tmp_path, "training:\n  lr: 1e-3\n  weight_decay: '5e-4'\n")
    assert yaml.safe_load(path.read_text())["training"]["lr"] == "1e-3"  # YAML 1.1 reads it as a string
    cfg = load_config(str(path))
    assert cfg.training.lr == pytest.approx(1e-3) and isinstance(cfg.training.lr, float)
    assert cfg.training.weight_decay == pytest.approx(5e-4)
    assert load_config(overrides=["training.lr=1e-3"]).training.lr == pytest.approx(1e-3)
    assert load_config(overrides=["training.lr=2"]).training.lr == 2.0  # an int is a fine float


def test_booleans_and_strings(tmp_path):
    cfg = load_config(overrides=["model.bidirectional=true", "logging.name=run7", "checkpoint.save=false"])
    assert cfg.model.bidirectional is True and cfg.checkpoint.save is False and cfg.logging.name == "run7"


# -- errors name the key -------------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("training.lrr=1", "training.lrr"),
    ("trainin.lr=1", "trainin.lr"),
    ("training=1", "training"),
    ("batching.batch_size=abc", "batching.batch_size"),
    ("batching.batch_size=1.5", "batching.batch_size"),
    ("batching.batch_size=true", "batching.batch_size"),
    ("model.bidirectional=3", "model.bidirectional"),
    ("training.lr=fast", "training.lr"),
    ("training.lr=.nan", "training.lr"),
    ("training.lr=-1", "training.lr"),
    ("training.lr=0", "training.lr"),
    ("batching.batch_size=0", "batching.batch_size"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.cell=rnn", "model.cell"),
    ("data.task=translate", "data.task"),
    ("logging.name=a/b", "logging.name"),
    ("logging.name=..", "logging.name"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert str(err.value).startswith(f"{key}:"), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,key", [
    (["data.task=regress"], "training.monitor"),  # default monitor val_accuracy does not exist for regress
    (["training.monitor=val_mse"], "training.monitor"),
    (["data.min_length=50", "data.max_length=10"], "data.min_length"),
    (["data.num_classes=9", "data.features=4"], "data.features"),
])
def test_cross_field_rules_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"^{key}:"):
        load_config(overrides=overrides)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(overrides=["training.lr"])


def test_yaml_unknown_key_and_wrong_type_name_file_and_key(tmp_path):
    path = write(tmp_path, "training:\n  lr: 0.1\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "training.learning_rate" in str(err.value)
    path = write(tmp_path, "batching:\n  batch_size: many\n", "b.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "batching.batch_size" in str(err.value)
    path = write(tmp_path, "- a\n- b\n", "list.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(path))


@pytest.mark.parametrize("text,line", [
    ("data:\n  num_train: 10\n   num_val: 5\n", 3),
    ("data:\n  num_train: 10\ntraining:\n\tlr: 1\n", 4),
])
def test_yaml_syntax_error_names_file_and_line(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    msg = str(err.value)
    assert msg.startswith(str(path)) and f"line {line}" in msg and "\n" not in msg, msg


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    assert issubclass(ConfigError, UserError)


def test_round_trips_through_dict_and_yaml(tmp_path):
    cfg = load_config(overrides=["model.hidden=8", "training.lr=3e-4", "logging.name=x", "data.task=tag",
                                 "training.monitor=val_loss"])
    assert from_dict(to_dict(cfg)) == cfg
    path = write(tmp_path, dump_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_reference_lists_every_key():
    table = reference_markdown()
    for key in all_keys():
        assert f"`{key}`" in table, key


# -- sections validate themselves on construction -------------------------------------------------

@pytest.mark.parametrize("make,key", [
    (lambda: ModelConfig(hidden=-1), "model.hidden"),
    (lambda: ModelConfig(cell="rnn"), "model.cell"),
    (lambda: ModelConfig(dropout=1.5), "model.dropout"),
    (lambda: ModelConfig(bidirectional=1), "model.bidirectional"),
    (lambda: TrainingConfig(epochs="3"), "training.epochs"),
    (lambda: TrainingConfig(lr=0), "training.lr"),
    (lambda: TrainingConfig(lr="fast"), "training.lr"),
    (lambda: TrainingConfig(lr=float("inf")), "training.lr"),
    (lambda: DataConfig(task="translate"), "data.task"),
    (lambda: DataConfig(val_fraction=0.9), "data.val_fraction"),
    (lambda: BatchingConfig(batch_size=0), "batching.batch_size"),
    (lambda: BatchingConfig(batch_size=2.0), "batching.batch_size"),
    (lambda: CheckpointConfig(keep_last=0), "checkpoint.keep_last"),
    (lambda: LoggingConfig(progress="fancy"), "logging.progress"),
    (lambda: WandbConfig(mode="on"), "wandb.mode"),
    (lambda: WandbConfig(per_rank="yes"), "wandb.per_rank"),
    (lambda: DistributedConfig(backend="mpi"), "distributed.backend"),
    (lambda: DistributedConfig(timeout_s=0), "distributed.timeout_s"),
])
def test_constructing_a_bad_section_names_the_key(make, key):
    with pytest.raises(ConfigError) as err:
        make()
    assert str(err.value).startswith(f"{key}:"), str(err.value)
    assert "\n" not in str(err.value)


def test_constructing_valid_sections_passes():
    model = ModelConfig(cell="gru", hidden=8, layers=1, bidirectional=True, dropout=0, pooling="max")
    assert (model.cell, model.hidden, model.dropout) == ("gru", 8, 0.0) and isinstance(model.dropout, float)
    training = TrainingConfig(epochs=3, lr=1, optimizer="sgd", amp="bf16", mode="single")
    assert training.lr == 1.0 and isinstance(training.lr, float)
    assert TrainingConfig(lr="1e-3").lr == pytest.approx(1e-3)  # as in YAML files
    assert DataConfig(format="npz", task="tag").format == "npz"  # train_path is a cross-field rule: validate()
    for cls in SECTIONS.values():
        assert cls() == cls()
    assert validate(Config(model=model, training=training)).model is model


def test_validate_checks_values_assigned_after_construction():
    cfg = Config()
    cfg.model.hidden = 0
    with pytest.raises(ConfigError, match=r"^model\.hidden: must be >= 1"):
        validate(cfg)
    cfg = Config()
    cfg.training.epochs = "3"
    with pytest.raises(ConfigError, match=r"^training\.epochs: expected an integer"):
        validate(cfg)


#: The choices each choice field accepted before they became Literal annotations (the table lists them).
DOCUMENTED_CHOICES = {
    "data.task": ("classify", "regress", "tag"),
    "data.format": ("synthetic", "npz", "tsv", "jsonl", "ts", "parquet", "hf"),
    "data.header": ("auto", "true", "false"),
    "data.truncate": ("error", "pre", "post"),
    "data.empty": ("error", "drop"),
    "data.missing": ("error", "zero", "ffill"),
    "batching.strategy": ("random", "bucket"),
    "model.cell": ("lstm", "gru"),
    "model.pooling": ("last", "mean", "max"),
    "model.execution": ("auto", "packed", "padded"),
    "training.optimizer": ("adam", "adamw", "sgd"),
    "training.mode": ("ddp", "dp", "single"),
    "training.amp": ("none", "bf16", "fp16", "auto"),
    "training.monitor": ("val_loss", "val_accuracy", "val_f1_macro", "val_mse", "val_mae"),
    "logging.progress": ("auto", "bar", "lines", "none"),
    "wandb.mode": ("disabled", "offline", "online"),
    "distributed.backend": ("auto", "nccl", "gloo"),
}


def test_literal_choices_are_the_documented_choices():
    table = {row.split(" | ")[0].strip("| `"): row.split(" | ")[2] for row in reference_markdown().splitlines()[2:]}
    found = {}
    for section_name, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key = f"{section_name}.{f.name}"
            if typing.get_origin(hints[f.name]) is typing.Literal:
                found[key] = typing.get_args(hints[f.name])
                assert choices_of(cls, f.name) == found[key]
                assert table[key] == " \\| ".join(found[key]), key
                assert getattr(cls(), f.name) in found[key], key  # the default is one of them
    assert found == DOCUMENTED_CHOICES


# -- model.target / model.args, data.target / data.args, the DataLoader keys ---------------------

TARGET = "model.target=pkg.mod:Net"


@pytest.mark.parametrize("value", ["nocolon", "a:", ":B", "a:1x", "a:b:C", "a:B.", "a:class", " :B"])
@pytest.mark.parametrize("section", ["model", "data"])
def test_bad_target_syntax_is_refused(section, value):
    with pytest.raises(ConfigError, match=rf"^{section}\.target: must be"):
        load_config(overrides=[f"{section}.target={value}"])
    cls = ModelConfig if section == "model" else DataConfig
    with pytest.raises(ConfigError, match=rf"^{section}\.target:"):
        cls(target=value)


@pytest.mark.parametrize("value", ["", "pkg.mod:Class", "path/to/file.py:Class", "examples/own_model.py:AttentionLSTM",
                                   "mod:Outer.Inner", "my_dir/file.py:_private"])
def test_good_target_syntax_is_accepted(value):
    assert load_config(overrides=[f"model.target={value}"]).model.target == value
    assert load_config(overrides=[f"data.target={value}"]).data.target == value
    assert ModelConfig(target=value).target == value and DataConfig(target=value).target == value


def test_model_args_overrides():
    one = load_config(overrides=[TARGET, "model.args.hidden=64", "model.args.name=007x", "model.args.rate=0.5",
                                 "model.args.on=true", "model.args.sizes=[1, 2]", "model.args.hidden=65"])
    assert one.model.args == {"hidden": 65, "name": "007x", "rate": 0.5, "on": True, "sizes": [1, 2]}
    whole = load_config(overrides=[TARGET, "model.args.x=1", "model.args={hidden: 64, inner: {a: [1, b]}}"])
    assert whole.model.args == {"hidden": 64, "inner": {"a": [1, "b"]}}  # replaces, does not merge
    assert load_config(overrides=[TARGET, "model.args.x=1", "model.args={}"]).model.args == {}
    assert load_config(overrides=[TARGET, "model.args={}", "model.args.x=2"]).model.args == {"x": 2}
    day = load_config(overrides=[TARGET, "model.args.day=2024-01-05"])  # YAML alone would make it a date
    assert day.model.args == {"day": "2024-01-05"}
    assert Config().model.args == {} and Config().model.args is not Config().model.args


@pytest.mark.parametrize("override,key", [
    ("model.args=3", "model.args"),
    ("model.args=[1, 2]", "model.args"),
    ("model.args=", "model.args"),
    ("model.args=null", "model.args"),
    ("model.args={hidden: 64", "model.args"),
    ("model.args={1: 2}", "model.args"),
    ("model.args.a.b=1", "model.args.a.b"),
    ("model.args.1x=1", "model.args.1x"),
    ("model.hidden.x=1", "model.hidden.x"),
    ("data.args=3", "data.args"),
])
def test_bad_args_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[TARGET, "data.target=pkg.mod:load", override])
    assert str(err.value).startswith(f"{key}:"), str(err.value)


def test_args_without_target_are_refused():
    with pytest.raises(ConfigError, match=r"^model\.args: only used with model\.target"):
        load_config(overrides=["model.args.hidden=64"])
    with pytest.raises(ConfigError, match=r"^data\.args: only used with data\.target"):
        load_config(overrides=["data.args.n=3"])
    assert load_config(overrides=["model.args={}", "data.args={}"]) == Config()  # empty is fine


def test_args_on_construction():
    model = ModelConfig(target="pkg.mod:Net", args={"hidden": 8, "sizes": (1, 2)})
    assert model.args == {"hidden": 8, "sizes": [1, 2]}  # tuples become YAML lists
    for bad, key in [([1], "model.args"), ({"not a name": 1}, "model.args"), ({"x": object()}, "model.args.x"),
                     ({"x": {"y": {1, 2}}}, "model.args.x.y")]:
        with pytest.raises(ConfigError, match=f"^{key}:"):
            ModelConfig(target="pkg.mod:Net", args=bad)
    given = {"hidden": 8}
    model = ModelConfig(target="pkg.mod:Net", args=given)
    given["hidden"] = 9
    assert model.args == {"hidden": 8}  # a copy, not the caller's dict


def test_args_round_trip_through_dict_and_yaml(tmp_path):
    path = write(tmp_path, "model:\n  target: path/to/file.py:Net\n  args: {hidden: 32, sizes: [1, 2], name: x}\n"
                           "data:\n  target: pkg.data:load\n  args:\n    n: 3\n    nested: {a: 1.5}\n")
    cfg = load_config(str(path))
    assert cfg.model.args == {"hidden": 32, "sizes": [1, 2], "name": "x"}
    assert cfg.data.args == {"n": 3, "nested": {"a": 1.5}}
    assert from_dict(to_dict(cfg)) == cfg
    assert load_config(str(write(tmp_path, dump_yaml(cfg), "dumped.yaml"))) == cfg
    assert load_config(str(path), ["model.args.hidden=8"]).model.args["hidden"] == 8
    bad = write(tmp_path, "model:\n  target: a:B\n  args: [1, 2]\n", "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert str(err.value).startswith(f"{bad} line 3: model.args:"), str(err.value)


def test_data_target_makes_format_and_train_path_unneeded():
    with pytest.raises(ConfigError, match=r"^data\.train_path:"):
        load_config(overrides=["data.format=npz"])
    cfg = load_config(overrides=["data.target=pkg.data:load", "data.format=npz", "data.args.n=3"])
    assert (cfg.data.target, cfg.data.train_path, cfg.data.args) == ("pkg.data:load", "", {"n": 3})
    load_config(overrides=["data.target=pkg.data:load", "data.task=tag", "data.format=tsv"])


@pytest.mark.parametrize("override,ok", [
    ("data.num_workers=0", True), ("data.num_workers=4", True), ("data.num_workers=-1", False),
    ("data.num_workers=1.5", False), ("data.prefetch_factor=1", True), ("data.prefetch_factor=0", False),
    ("data.persistent_workers=false", True), ("data.persistent_workers=2", False),
])
def test_dataloader_keys(override, ok):
    key = override.split("=")[0]
    if ok:
        load_config(overrides=[override])
    else:
        with pytest.raises(ConfigError, match=f"^{key}:"):
            load_config(overrides=[override])
    defaults = Config().data
    assert (defaults.num_workers, defaults.prefetch_factor, defaults.persistent_workers) == (0, 2, True)


# -- the command line, as a user runs it ---------------------------------------------------------

def assert_one_line_error(proc, *needles: str) -> None:
    proc.check(2)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.report()
    assert "Traceback" not in proc.stderr + proc.stdout, proc.report()
    for needle in needles:
        assert needle in lines[0], proc.report()


def test_check_config_prints_resolved_yaml(tmp_path):
    proc = python("-m", "ddp_seq", "check-config", "model.hidden=12", "training.lr=1e-3").check(0)
    printed = write(tmp_path, proc.stdout)
    assert load_config(str(printed)) == load_config(overrides=["model.hidden=12", "training.lr=1e-3"])


@pytest.mark.parametrize("args,needles", [
    (["-m", "ddp_seq", "check-config", "bad.key=1"], ["bad.key"]),
    (["-m", "ddp_seq", "check-config", "training.lr=-1"], ["training.lr"]),
    (["train.py", "bad.key=1"], ["bad.key"]),
    (["train.py", "batching.batch_size=0"], ["batching.batch_size"]),
])
def test_cli_bad_key_is_one_line_exit_2(args, needles):
    assert_one_line_error(python(*args), *needles)


def test_cli_yaml_error_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, "data:\n  num_train: 10\n   num_val: 5\n")
    assert_one_line_error(python("-m", "ddp_seq", "check-config", "--config", path), str(path), "line 3")
    assert_one_line_error(python("train.py", "--config", tmp_path / "missing.yaml"), "missing.yaml")


def test_check_config_does_not_import_torch():
    """config.py promises a check "in a fraction of a second before any process is launched" and the
    Makefile runs check-config first as the fast, torch-free step: it must not import torch."""
    code = ("import sys; from ddp_seq.cli import main; "
            "rc = main(['check-config', 'model.hidden=8']); "
            "rc_bad = main(['check-config', 'bad.key=1']); "
            "print(rc, rc_bad, 'torch' in sys.modules)")
    proc = python("-c", code).check(0)
    assert proc.stdout.strip().splitlines()[-1] == "0 2 False", proc.report()


def test_config_reference_prints_every_key():
    script = Path(PYTHON).with_name("ddp-seq")
    command = [script] if script.exists() else [shutil.which("ddp-seq") or ""]
    if not command[0]:
        pytest.skip("the ddp-seq console script is not installed")
    proc = run([*command, "config-reference"]).check(0)
    for key in all_keys():
        assert f"`{key}`" in proc.stdout, key
    module = python("-m", "ddp_seq", "config-reference").check(0)
    assert module.stdout == proc.stdout


def test_train_py_help_runs():
    proc = python(REPO / "train.py", "--help").check(0)
    assert "usage" in proc.stdout and "train" in proc.stdout


def test_help_lists_every_command_main_dispatches():
    from ddp_seq.cli import _parser

    text = _parser().format_help()
    for command in ("train", "check-config", "evaluate", "predict", "export", "report", "make-data", "bench",
                    "parity", "config-reference"):
        assert f"    {command} " in text, command


@pytest.mark.parametrize("value", ["007", "2024_01", "2024-01-05", "yes", "0x1f", "1e3"])
def test_string_override_is_taken_literally(value):
    """``logging.name=007`` on the command line names the run '007': a string key must not go through
    YAML's scalar typing (which turns 007 into 7, 2024_01 into 202401 and refuses 2024-01-05)."""
    assert load_config(overrides=[f"logging.name={value}"]).logging.name == value


# -- the generated table in docs/config.md ------------------------------------------------------------

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def test_docs_config_table_is_in_sync():
    text = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1
    table = text.split(START, 1)[1].split(END, 1)[0]
    assert table.strip() == reference_markdown().strip(), "run: ddp-seq config-reference --update docs/config.md"


def test_config_reference_update_rewrites_only_the_table(tmp_path):
    readme = write(tmp_path, f"# T\n\nintro\n\n{START}\n| stale |\n{END}\n\n## After\nkeep me\n", "README.md")
    python("-m", "ddp_seq", "config-reference", "--update", readme).check(0)
    text = readme.read_text()
    assert text.startswith("# T\n\nintro\n\n") and text.endswith(f"{END}\n\n## After\nkeep me\n")
    assert "| stale |" not in text
    assert text.split(START, 1)[1].split(END, 1)[0].strip() == reference_markdown().strip()


def test_config_reference_update_never_deletes_text_after_an_unclosed_marker(tmp_path):
    """A README whose end marker is missing (typo, bad merge) must not lose everything after the
    start marker: refuse with exit code 2, or keep the text."""
    original = f"# T\n\n{START}\n| old |\n\n## Usage\nimportant text\n"
    readme = write(tmp_path, original, "README.md")
    proc = python("-m", "ddp_seq", "config-reference", "--update", readme)
    if proc.returncode == 0:
        assert "important text" in readme.read_text(), "the text after the start marker was deleted"
    else:
        proc.check(2)
        assert readme.read_text() == original
