"""A config file's string keys keep the text the user wrote (issue 26, row 9).

YAML 1.1 (PyYAML) converts plain scalars before the schema's type applies: ``1.10`` -> 1.1,
``0755`` -> 493, ``1_000`` -> 1000, ``12:30`` -> 750, ``yes``/``off`` -> booleans. For a string key
the file now gives what the command line gives (the text), so ``logging: {name: 1.10}`` and
``logging.name=1.10`` name the same run directory; integer, float and boolean keys still get
YAML's values. Errors name the file, the line and the key.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ddp_seq.config import Config, ConfigError, load_config
from ddp_seq.config_fields import field_specs
from ddp_seq.config_text import dump_yaml

#: Plain scalars YAML 1.1 turns into something else than their text (checked in the first test).
CONVERTED = ["1.10", "0755", "1_000", "12:30", "yes", "no", "on", "off", "true", "1.0e+3", "0x1F", "0b101", "+12",
             ".5", "2024-01-05", "007"]
#: String keys whose own check refuses every value above: the message must show the text as written.
REFUSING = {"data.target", "model.target", "data.tokenizer"}
#: What a string key needs besides itself to be a valid config.
CONTEXT = {"data.input_column": ["data.format=parquet", "data.train_path=t.parquet"],
           "data.target_column": ["data.format=parquet", "data.train_path=t.parquet"]}


def string_keys() -> list[str]:
    """Every free-text key of the schema (string-typed, no fixed choices)."""
    cfg = Config()
    return [f"{section}.{name}" for section in vars(cfg)
            for name, spec in field_specs(type(getattr(cfg, section))).items()
            if spec.kind is str and spec.choices is None]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def value_of(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def test_yaml_1_1_converts_each_of_these_plain_scalars():
    """The premise: each text of CONVERTED is not a string to yaml.safe_load."""
    for text in CONVERTED:
        assert not isinstance(yaml.safe_load(f"k: {text}")["k"], str), text


def test_string_keys_cover_the_schema():
    keys = string_keys()
    assert {"logging.name", "logging.root", "data.train_path", "checkpoint.resume", "wandb.tags"} <= set(keys)
    assert len(keys) >= 15


@pytest.mark.parametrize("dotted", string_keys())
def test_every_string_key_keeps_the_text_written_in_the_file(tmp_path, dotted):
    section, key = dotted.split(".")
    for text in CONVERTED:
        path = write(tmp_path, f"{section}:\n  {key}: {text}\n")
        if dotted in REFUSING:  # refused, naming the value the user wrote, not YAML's conversion
            with pytest.raises(ConfigError) as err:
                load_config(path, CONTEXT.get(dotted, []))
            assert str(err.value).startswith(f"{dotted}:") and str(err.value).endswith(f"got {text!r}"), text
            continue
        from_file = load_config(path, CONTEXT.get(dotted, []))
        assert value_of(from_file, dotted) == text
        # The command line has always kept the text: the two now give the same config.
        assert from_file == load_config(None, [*CONTEXT.get(dotted, []), f"{dotted}={text}"])


def test_the_reported_run_name_and_quoted_block_and_flow_forms(tmp_path):
    assert load_config(write(tmp_path, "logging: {name: 1.10}\n")).logging.name == "1.10"
    assert load_config(write(tmp_path, "logging:\n  name: '1.10'\n")).logging.name == "1.10"
    assert load_config(write(tmp_path, 'logging:\n  name: "a\\tb"\n')).logging.name == "a\tb"  # escapes apply
    assert load_config(write(tmp_path, "wandb:\n  tags: |-\n    a,b\n")).wandb.tags == "a,b"
    shared = "logging: &d\n  name: 0755\nwandb:\n  <<: *d\n"
    cfg = load_config(write(tmp_path, shared))  # an anchor and a merge key: the text still
    assert cfg.logging.name == "0755" and cfg.wandb.name == "0755"


def test_typed_keys_still_get_yaml_values_as_on_the_command_line(tmp_path):
    text = ("training:\n  epochs: 1_000\n  lr: 1e-3\n  weight_decay: 1.0e-2\n  seed: 0755\n"
            "model:\n  bidirectional: yes\n  args: {width: 1.10}\n  target: m.py:Net\n"
            "checkpoint:\n  save: off\nwandb:\n  per_rank: on\n")
    cfg = load_config(write(tmp_path, text))
    assert (cfg.training.epochs, cfg.training.lr, cfg.training.weight_decay) == (1000, 1e-3, 1e-2)
    assert cfg.training.seed == 493  # YAML's octal, for an integer key: what data.seed=0755 gives too
    assert cfg.model.bidirectional is True and cfg.checkpoint.save is False and cfg.wandb.per_rank is True
    assert cfg.model.args == {"width": 1.1}  # a mapping's entries are YAML values, as model.args.width=1.10
    assert cfg == load_config(None, ["training.epochs=1_000", "training.lr=1e-3", "training.weight_decay=1.0e-2",
                                     "training.seed=0755", "model.bidirectional=yes", "model.args.width=1.10",
                                     "model.target=m.py:Net", "checkpoint.save=off", "wandb.per_rank=on"])


@pytest.mark.parametrize("text,message", [
    ("training:\n  lr: 0.1\n  epochs: many\n", "line 3: training.epochs: expected an integer, got 'many'"),
    ("logging:\n  root: runs\n  name:\n", "line 3: logging.name: expected a string, got None"),
    ("logging:\n  name: ~\n", "line 2: logging.name: expected a string, got None"),
    ("logging:\n  name: [a, b]\n", "line 2: logging.name: expected a string, got ['a', 'b']"),
    ("model:\n  hidden: 8\ndata: 3\n", "line 3: data: expected a mapping of keys"),
    ("training:\n  lrr: 1\n", "line 2: training.lrr: unknown key"),
])
def test_errors_are_one_line_naming_file_line_and_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path} {message}") and "\n" not in str(err.value)


def test_a_dumped_config_of_such_texts_loads_back_equal(tmp_path):
    cfg = load_config(None, ["logging.name=1.10", "wandb.tags=yes", "checkpoint.resume=none", "wandb.group=12:30"])
    assert load_config(write(tmp_path, dump_yaml(cfg))) == cfg
