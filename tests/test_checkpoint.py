"""Checkpoints: atomic writes, weights_only loading, one-line errors for bad files, no code execution."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ddp_seq.builders import build_seq_model, model_from_checkpoint
from ddp_seq.config import load_config, to_dict
from ddp_seq.errors import UserError
from ddp_seq.train.checkpoint import FORMAT_VERSION, load_checkpoint, save_atomic


class CreatesFile:
    """Unpickling this object opens (creates) ``target`` -- the stand-in for arbitrary code."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def sample_state() -> dict:
    return {"model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)},
            "config": {"training": {"lr": 0.01, "optimizer": "adam"}}, "epoch": 3, "metrics": {"val_loss": 0.5},
            "history": [1, 2.5, "x", None, True]}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_save_atomic_round_trip(tmp_path):
    path = tmp_path / "deep" / "dir" / "ck.pt"
    assert save_atomic(sample_state(), path) == path
    state = load_checkpoint(path)
    assert state["format_version"] == FORMAT_VERSION
    assert torch.equal(state["model"]["w"], sample_state()["model"]["w"])
    assert {k: v for k, v in state.items() if k not in ("model", "format_version")} == \
        {k: v for k, v in sample_state().items() if k != "model"}
    assert torch.load(path, weights_only=True)["epoch"] == 3
    # overwrite in place: readers see the new file, no temporary file is left behind
    save_atomic({**sample_state(), "epoch": 4}, path)
    assert load_checkpoint(path)["epoch"] == 4
    assert leftovers(path.parent) == []


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic(sample_state(), path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 -- a lambda cannot be pickled: the write dies midway
        save_atomic({"model": {"w": torch.ones(1000)}, "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["epoch"] == 3
    assert leftovers(tmp_path) == []


def test_truncated_and_empty_and_missing_files_are_user_errors(tmp_path):
    path = tmp_path / "ck.pt"
    save_atomic(sample_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    path.write_bytes(b"")
    with pytest.raises(UserError, match="ck.pt"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "absent.pt")
    with pytest.raises(UserError, match="absent-dir"):
        load_checkpoint(tmp_path / "absent-dir" / "x.pt")


def test_wrong_format_version_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format_version": FORMAT_VERSION + 1, "model": {}}, path)
    with pytest.raises(UserError, match="format version"):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(UserError, match=str(path.name)):
        load_checkpoint(path)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, writer):
    def write(target: Path, path: Path) -> None:
        payload = {"format_version": FORMAT_VERSION, "model": {}, "x": CreatesFile(target)}
        if writer == "torch.save":
            torch.save(payload, path)
        else:
            with open(path, "wb") as f:
                pickle.dump(payload, f, protocol=2)

    # control: the payload really runs when loaded without weights_only
    control_target, control = tmp_path / "control-pwned", tmp_path / "control.pt"
    write(control_target, control)
    assert not control_target.exists()
    if writer == "torch.save":
        torch.load(control, weights_only=False)
    else:
        pickle.loads(control.read_bytes())
    assert control_target.exists(), "the payload must be live, or this test proves nothing"

    target, path = tmp_path / "pwned", tmp_path / "evil.pt"
    write(target, path)
    with pytest.raises(UserError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not target.exists(), "loading a checkpoint executed code from the file"


def test_model_from_checkpoint(tmp_path):
    cfg = load_config(overrides=["model.hidden=8", "model.embedding_dim=8", "model.cell=gru",
                                 "model.bidirectional=true"])
    torch.manual_seed(0)
    model = build_seq_model("classify", 8, 4, cfg.model)
    path = save_atomic({"model": model.state_dict(), "config": to_dict(cfg),
                        "extra": {"num_inputs": 8, "num_outputs": 4}}, tmp_path / "m.pt")
    rebuilt, cfg2, state = model_from_checkpoint(path)
    assert cfg2 == cfg and state["extra"]["num_inputs"] == 8
    x, lengths = torch.randn(3, 7, 8), torch.tensor([7, 2, 5])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, lengths), model.eval()(x, lengths), atol=0, rtol=0)
    # weights that do not fit the saved config: one line naming the file
    other = build_seq_model("classify", 8, 4, load_config(overrides=["model.hidden=5"]).model)
    bad = save_atomic({"model": other.state_dict(), "config": to_dict(cfg),
                       "extra": {"num_inputs": 8, "num_outputs": 4}}, tmp_path / "bad.pt")
    expected = r"bad.pt: .*parameter 'input_layer.weight' has shape \[64, 8\] in the checkpoint but \[8, 8\]"
    with pytest.raises(UserError, match=expected) as err:
        model_from_checkpoint(bad)
    assert "\n" not in str(err.value)
