"""The user's own parts: a model that is not SeqModel, a Dataset without lengths, a loss function --
through the Trainer (1 vs 2 ranks), through ``model.target`` / ``data.target`` in a config, and
``evaluate`` / ``predict`` from such a checkpoint with nothing but it and the importable module.
Bad targets stop with one line naming the key (exit 2), and a checkpoint never makes ddp_seq
import the code its config names."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import python, torchrun

from ddp_seq.cli import main
from ddp_seq.train.checkpoint import load_checkpoint, save_atomic, trained_at

WORKER = "tests/workers/user_parts.py"
MODEL = f"model.target={WORKER}:MeanPoolGRU"
DATA = f"data.target={WORKER}:make_datasets"
#: The worker's own settings, as config overrides (see user_parts.OVERRIDES).
SMALL = ["batching.strategy=random", "batching.batch_size=16", "batching.eval_batch_size=8", "training.epochs=2",
         "training.lr=0.05", "training.warmup_steps=2", "training.log_every=4", "training.seed=3",
         "logging.progress=lines", "distributed.backend=gloo"]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def api_runs(tmp_path_factory) -> dict[str, dict]:
    """The worker's Trainer run on 1 rank, and on 2 ranks with the built-in objective and with a loss
    function: the two 2-rank runs share one torchrun launch (one after the other in one process group).
    The 1-rank run is the worker's ``main`` called in this process: what ``python WORKER`` runs,
    without starting an interpreter and torch again."""
    from workers.user_parts import main as run_worker

    one, two = tmp_path_factory.mktemp("w1"), tmp_path_factory.mktemp("w2")
    assert run_worker(str(one), "classify") == 0
    torchrun(WORKER, two, "classify", "loss_fn", nproc=2).check()
    return {"w1": torch.load(one / "classify.pt", weights_only=True),
            "w2": torch.load(two / "classify.pt", weights_only=True),
            "w2_loss_fn": torch.load(two / "loss_fn.pt", weights_only=True)}


@pytest.mark.slow
def test_own_model_one_and_two_ranks_agree(api_runs):
    """Same global batches, loss divided by the global count: 2 ranks reproduce 1 rank's training.
    Tolerance 1e-5: the two sum the same terms in other orders (measured ~2e-7 after 20 steps of Adam)."""
    one, two = api_runs["w1"], api_runs["w2"]
    assert max_diff(one["model"], two["model"]) < 1e-5
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-5)
    assert one["history"][-1]["val_accuracy"] > 0.6  # it learns (3 classes, chance 0.33)


@pytest.mark.slow
def test_a_loss_function_keeps_the_global_normalisation(api_runs):
    """A user's (sum, local count) loss: the count is all-reduced and the gradients scaled by W / N,
    which must train exactly as the built-in objective that knows N before backward."""
    builtin, own = api_runs["w2"], api_runs["w2_loss_fn"]
    assert max_diff(builtin["model"], own["model"]) < 1e-6
    assert [h["train_loss"] for h in own["history"]] == pytest.approx([h["train_loss"] for h in builtin["history"]])
    assert set(own["history"][-1]) >= {"val_loss"} and "val_accuracy" not in own["history"][-1]


@pytest.mark.slow
def test_model_and_data_targets_train_as_the_api_does(api_runs, tmp_path):
    """``model.target`` + ``data.target`` through train.py on 2 ranks: the same weights as the API run."""
    torchrun("train.py", MODEL, DATA, "data.seed=0", *SMALL, f"logging.root={tmp_path}", "logging.name=cfg").check()
    state = load_checkpoint(tmp_path / "cfg" / "checkpoints" / "last.pt")
    assert max_diff(state["model"], api_runs["w2"]["model"]) < 1e-5
    assert state["config"]["model"]["target"] == f"{WORKER}:MeanPoolGRU"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> tuple[Path, Path]:
    """A user model on the built-in TSV reader (token ids: the model gets vocab_size), 2 ranks."""
    root = tmp_path_factory.mktemp("text")
    lines = [f"{'pos' if i % 2 else 'neg'}\t{'good fine nice' if i % 2 else 'bad awful poor'} w{i % 5}"
             for i in range(40)]
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    torchrun("train.py", MODEL, "model.args.hidden=10", "data.format=tsv", f"data.train_path={root / 'train.tsv'}",
             "data.tokenizer=whitespace", "data.val_fraction=0.25", *SMALL, f"logging.root={root}",
             "logging.name=text").check()
    return root, root / "text" / "checkpoints" / "best.pt"


#: ``ddp_seq.cli.main(argv)`` for each JSON-encoded argv on the command line, in order, in one fresh
#: interpreter (one start of Python and torch for several commands); exits with the first non-zero code.
_RUN_COMMANDS = """
import json, sys
from ddp_seq.cli import main
for argv in sys.argv[1:]:
    code = main(json.loads(argv))
    if code:
        sys.exit(code)
"""


@pytest.mark.slow
def test_evaluate_and_predict_rebuild_the_user_model_from_its_checkpoint(text_run, capsys):
    root, best = text_run
    # Refused before anything is imported: in this process, as test_a_checkpoint_naming_a_target_never_imports_it.
    assert main(["evaluate", "--checkpoint", str(best)]) == 2
    err = capsys.readouterr().err
    assert "model.target" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # Allowed: evaluate and predict in a fresh interpreter that has nothing but the checkpoint and the
    # module its config names (this process has imported the worker), one after the other.
    (root / "new.tsv").write_text("good fine nice w1\nbad awful poor w2\n")
    evaluate = ["evaluate", "--checkpoint", str(best), MODEL, "--output", str(root / "m.json")]
    predict = ["predict", "--checkpoint", str(best), "--input", str(root / "new.tsv"), "--output",
               str(root / "p.jsonl"), "--trust-target"]
    allowed = python("-c", _RUN_COMMANDS, json.dumps(evaluate), json.dumps(predict)).check()
    metrics = json.loads((root / "m.json").read_text())
    saved = load_checkpoint(best)
    assert metrics["accuracy"] == pytest.approx(trained_at(saved)["metrics"]["val_accuracy"], abs=1e-9), allowed.stdout
    rows = [json.loads(line) for line in (root / "p.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1] and [r["prediction"] for r in rows] == ["pos", "neg"]


def test_a_checkpoint_naming_a_target_never_imports_it(tmp_path, capsys):
    """A checkpoint is data: its config's model.target is imported only on the user's say-so.
    The payload writes a marker file when imported; refused, it must never run."""
    marker = tmp_path / "payload-ran"
    payload = tmp_path / "payload.py"
    payload.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\nclass Evil: pass\n")
    from ddp_seq.config import Config, to_dict

    cfg = to_dict(Config())
    cfg["model"]["target"] = f"{payload}:Evil"
    ckpt = save_atomic({"model": {}, "config": cfg, "num_inputs": 8, "num_outputs": 4}, tmp_path / "evil.pt")
    for command in (["evaluate", "--checkpoint", str(ckpt)],
                    ["predict", "--checkpoint", str(ckpt), "--input", str(payload), "--output", str(tmp_path / "o")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "model.target" in err and "--trust-target" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()


@pytest.mark.parametrize("overrides, key, words", [
    (["model.target=no_such_module_xyz:Model", DATA], "model.target", "cannot import"),
    ([f"model.target={WORKER}:NoSuchClass", DATA], "model.target", "cannot import"),
    ([f"model.target={WORKER}:OVERRIDES", DATA], "model.target", "not a class or function"),
    ([f"model.target={WORKER}:MeanPoolGRU", "model.args.depth=3", DATA], "model.target", "depth"),
    ([f"model.target={WORKER}:make_datasets", DATA], "model.target", "not a torch.nn.Module"),
    ([f"model.target={WORKER}:MeanPoolGRU", "model.args.hidden=0", DATA], "model.target", "hidden_size"),
    ([f"model.target={WORKER}:PerStepOutputs", DATA], "model.target", "failed on a probe batch"),
    ([f"model.target={WORKER}:TupleOutputs", DATA], "model.target", "returned a tuple, not a tensor"),
    ([f"data.target={WORKER}:dict_datasets"], "data.target", "train data: item 0 is a dict (keys 'x', 'y')"),
    ([f"data.target={WORKER}:ToySequences", "data.args.n=5"], "data.target", "should return (train_dataset, val"),
    (["data.target=tests/workers/missing.py:f"], "data.target", "not found"),
])
def test_bad_targets_stop_before_training_with_one_line(tmp_path, capsys, overrides, key, words):
    code = main(["train", *overrides, *SMALL, f"logging.root={tmp_path}", "logging.name=bad"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith(f"ddp-seq: error: {key}: ") and words in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "bad").exists()  # stopped before a run directory was made for it


def test_a_dataset_with_an_empty_sequence_is_the_users_error():
    from workers.user_parts import MeanPoolGRU

    from ddp_seq import Trainer, UserError, load_config

    items = [(torch.ones(3, 3), 0), (torch.ones(0, 3), 1), (torch.ones(2, 3), 2)]
    with pytest.raises(UserError, match="train data: sample 1 has length 0"):
        Trainer(MeanPoolGRU(3, 3), items, items, load_config(overrides=["checkpoint.save=false"]))


def test_the_trainer_prints_and_records_by_default(tmp_path, capsys):
    """Handed no logger, the Trainer prints its epoch lines on rank 0 and, given run_dir (created
    if missing), writes train.log, metrics.jsonl and checkpoints there."""
    from workers.user_parts import MeanPoolGRU, make_datasets

    from ddp_seq import Trainer, load_config

    train, val = make_datasets(num_train=24, num_val=8)
    cfg = load_config(overrides=["training.epochs=1", "batching.batch_size=8", "logging.progress=lines"])
    run = tmp_path / "new" / "run"
    Trainer(MeanPoolGRU(3, 3), train, val, cfg, run_dir=run).fit()
    out = capsys.readouterr().out
    assert "epoch 1/1  train_loss" in out and "best val_accuracy" in out
    assert [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()][-2:] == \
        ["epoch", "summary"]
    assert "epoch 1/1" in (run / "train.log").read_text() and (run / "checkpoints" / "last.pt").exists()


def test_a_target_file_imports_its_sibling_modules(tmp_path, monkeypatch):
    """``path/to/file.py:Class`` runs as ``python path/to/file.py`` would: its folder is importable."""
    from ddp_seq.builders import import_target

    (tmp_path / "helper_layers.py").write_text("WIDTH = 7\n")
    (tmp_path / "net.py").write_text("import helper_layers\n\nclass Net:\n    width = helper_layers.WIDTH\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the folder added is this test's only
    assert import_target(f"{tmp_path / 'net.py'}:Net", "model.target").width == 7
