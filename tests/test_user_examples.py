"""The user-facing examples run as examples/README.md says: ``examples/*.py`` on 2 ranks (tiny sizes,
``--tiny``), own_loop.py's first step equals one process stepping on the whole global batch, and
``configs/own-model.yaml`` trains through train.py and evaluates only with the user's trust."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, Proc, python, torchrun
from torch.nn.utils.rnn import pad_sequence

from ddp_seq import BucketBatchSampler, collate, load_config
from ddp_seq.cli import main

EXAMPLES = REPO / "examples"
LAST_LINE = re.compile(r"^val_\w+ [0-9.]+$")


def last_line(proc: Proc) -> str:
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.report()
    assert LAST_LINE.match(lines[-1]), proc.report()
    return lines[-1]


@pytest.fixture
def examples(monkeypatch: pytest.MonkeyPatch):
    """Import examples/*.py as the scripts see each other (the examples directory on sys.path)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module


def test_own_model_is_a_model_target_whose_logits_ignore_padding_and_batch_mates(monkeypatch):
    from ddp_seq.builders import build_data, build_model

    monkeypatch.chdir(REPO)  # the config's targets are relative to the repository root, as documented
    cfg = load_config("configs/own-model.yaml", ["data.args.num_train=16", "data.args.num_val=8"])
    data = build_data(cfg)
    assert (data.num_inputs, data.num_outputs, len(data.train), len(data.val)) == (1, 3, 16, 8)
    torch.manual_seed(0)
    model = build_model(cfg, data).eval()
    assert type(model).__name__ == "AttentionLSTM" and model.rnn.hidden_size == cfg.model.args["hidden"]
    items = [data.train[i] for i in range(6)]
    batch = collate(items)
    assert len(set(batch.lengths.tolist())) > 1, "the check needs padding"
    with torch.no_grad():
        together = model(batch.inputs, batch.lengths)
        # Junk in the padding and extra padded steps change nothing (the attention masks them).
        junk = torch.cat([batch.inputs.masked_fill(~batch.mask[..., None], 1e3),
                          torch.full((len(items), 7, 1), -1e3)], dim=1)
        torch.testing.assert_close(model(junk, batch.lengths), together, atol=1e-5, rtol=1e-5)
        alone = torch.cat([model(x[None], torch.tensor([len(x)])) for x, _ in items])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["own_model", "dataparallel_vs_ddp"])
def test_example_trains_on_two_ranks(name):
    proc = torchrun(EXAMPLES / f"{name}.py", "--tiny").check()
    last_line(proc)
    if name == "dataparallel_vs_ddp":  # both sides report; no GPU here, and the script says what that means
        assert re.search(r"nn\.DataParallel +1 process +val_accuracy [0-9.]+", proc.stdout), proc.report()
        assert re.search(r"ddp_seq \+ DDP +2 rank\(s\) +val_accuracy [0-9.]+", proc.stdout), proc.report()
        if not torch.cuda.is_available():
            assert "no GPU visible" in proc.stdout, proc.report()


ONE_PROCESS = ["own_model", "own_loop", "dataparallel_vs_ddp"]

#: Runs each example named on the command line as ``python examples/NAME.py --tiny`` would (the script
#: as ``__main__``, its directory first on sys.path, argv ``[script, --tiny]``), one after the other in
#: one interpreter: one start of Python and torch for the three. A line ``=== NAME`` opens each one's output.
_RUN_SCRIPTS = """
import runpy, sys
for name in sys.argv[1:]:
    print("=== " + name, flush=True)
    script = {examples!r} + "/" + name + ".py"
    sys.argv, sys.path[0] = [script, "--tiny"], {examples!r}
    runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def one_process_runs() -> dict[str, Proc]:
    """Every example in ONE_PROCESS run without torchrun, in a single process: name -> its part of the output."""
    proc = python("-c", _RUN_SCRIPTS.format(examples=str(EXAMPLES)), *ONE_PROCESS).check()
    parts = re.split(r"^=== (\w+)\n", proc.stdout, flags=re.M)
    assert parts[0].strip() == "" and parts[1::2] == ONE_PROCESS, proc.report()
    return {name: Proc(proc.args, proc.returncode, out, proc.stderr) for name, out in zip(parts[1::2], parts[2::2])}


@pytest.mark.slow
@pytest.mark.parametrize("name", ONE_PROCESS)
def test_example_runs_as_one_process_without_torchrun(one_process_runs, name):
    last_line(one_process_runs[name])


@pytest.mark.slow
def test_own_loop_first_step_on_two_ranks_is_one_process_on_the_global_batch(tmp_path: Path, examples):
    out = tmp_path / "first_step.pt"
    proc = torchrun(EXAMPLES / "own_loop.py", "--tiny", "--grad-out", out).check()
    last_line(proc)
    saved = torch.load(out, weights_only=True)

    # The reference: one process, the same seed (same initial weights) and data, the first global
    # batch of epoch 0 -- a function of (seed, epoch) alone, whatever the world size -- padded by
    # torch's pad_sequence, and the plain mean cross-entropy over it.
    own_loop = examples("own_loop")
    size = own_loop.SIZES["tiny"]
    train, _ = own_loop.make_datasets(seed=own_loop.SEED, num_train=size["num_train"], num_val=size["num_val"])
    sampler = BucketBatchSampler(train, own_loop.BATCH_SIZE, num_replicas=1, rank=0, seed=own_loop.SEED)
    sampler.set_epoch(0)
    global_batch = list(next(iter(sampler)))
    shares = saved["shares"]
    assert len(shares) == 2 and sorted(shares[0] + shares[1]) == sorted(global_batch)
    assert saved["global_count"] == len(global_batch)
    # Shares are cut to equal padded tokens, so here they hold different numbers of sequences: the
    # usual per-rank mean would then weigh samples unequally (checked to differ below).
    assert len(shares[0]) != len(shares[1]), shares

    def gradients(indices: list[int]) -> dict[str, torch.Tensor]:
        model = own_loop.build_model()
        sequences = [train[i][0] for i in indices]
        logits = model(pad_sequence(sequences, batch_first=True), torch.tensor([len(s) for s in sequences]))
        F.cross_entropy(logits, torch.tensor([train[i][1] for i in indices])).backward()
        return {name: p.grad for name, p in model.named_parameters()}

    reference = gradients(global_batch)
    assert saved["grads"].keys() == reference.keys()
    # atol 1e-6: the gradients are at most ~0.1 here, and both sides are the same float32 sums in a
    # different order (two shares padded to their own longest, then gloo's all-reduce average, vs one
    # batch), which differ by ~1e-8 (measured: 1.4e-8 at most); a normalisation mistake is far off (the
    # mean of the two per-rank means, DDP's usual recipe, is off by 5e-3 here).
    for name, grad in reference.items():
        torch.testing.assert_close(saved["grads"][name], grad, atol=1e-6, rtol=0, msg=name)
    per_rank_means = [gradients(share) for share in shares]
    naive = {name: (per_rank_means[0][name] + per_rank_means[1][name]) / 2 for name in reference}
    assert max(float((naive[n] - reference[n]).abs().max()) for n in reference) > 1e-4


@pytest.mark.slow
def test_own_model_config_trains_on_two_ranks_and_evaluates_only_when_trusted(tmp_path: Path, monkeypatch, capsys):
    torchrun("train.py", "--config", "configs/own-model.yaml", "data.args.num_train=256", "data.args.num_val=128",
             "training.epochs=1", f"logging.root={tmp_path}", "logging.name=run", "logging.progress=none").check()
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert best.is_file()
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in epochs if r["kind"] == "epoch"][-1]

    # Evaluation is one process: ddp_seq.cli.main in this one, what `python -m ddp_seq evaluate` runs,
    # from the repository root, where the config's relative model.target is found.
    monkeypatch.chdir(REPO)
    capsys.readouterr()  # what was printed before (nothing is expected): not part of the evaluation's output
    assert main(["evaluate", "--checkpoint", str(best)]) == 2
    refused = capsys.readouterr()
    lines = refused.err.strip().splitlines()
    assert len(lines) == 1 and "model.target=examples/own_model.py:AttentionLSTM" in lines[0], refused.err
    assert refused.out == "", refused.out

    result = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(best), "--trust-target", "--output", str(result)]) == 0
    ok = capsys.readouterr()
    assert re.search(r"^loss [0-9.]+  accuracy [0-9.]+  f1_macro [0-9.]+$", ok.out, re.M), ok.out + ok.err
    metrics = json.loads(result.read_text())
    assert metrics["samples"] == 128
    # The same weights on the same validation set (make_datasets with data.seed and data.args from the
    # checkpoint's config) as training's validation on 2 ranks: the same loss up to float32 rounding,
    # and the same accuracy (one near-tie allowed to flip, as the batches are split differently).
    assert metrics["loss"] == pytest.approx(trained["val_loss"], rel=1e-5)
    assert abs(metrics["accuracy"] - trained["val_accuracy"]) <= 1 / 128 + 1e-12
