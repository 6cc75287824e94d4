"""``ddp-seq export --format onnx``: onnxruntime reproduces the PyTorch model on batches of mixed lengths.

Checkpoints are built here the way the trainer writes them (``checkpoint_extra`` + ``save_atomic``,
weights of a model built from the config with ``builders.build_model``), without training: what is
checked is that the exported graph computes what the checkpoint's model computes, for any weights.

Exporting takes seconds per model, so the full matrix (3 tasks x LSTM/GRU x uni/bi, token and feature
inputs, the three poolings) is marked slow; the two unmarked cases cover a packed-trained bidirectional
2-layer LSTM tagger on tokens and a GRU classifier on features. An export's CPU seconds (torch 2.13,
measured): decompositions 1.4 (LSTM/GRU ``while_loop``s compiled by dynamo), graph capture 0.8,
torch.onnx's torchlib registry, rebuilt on each call, 0.6, onnxruntime 0.4, optimizer 0.14; no subprocess.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from ddp_seq.builders import (  # noqa: E402
    DataParts,
    build_model,
    checkpoint_extra,
    model_from_checkpoint,  # noqa: E402
)
from ddp_seq.cli import main  # noqa: E402
from ddp_seq.cli.export import ATOL, OPSET, RTOL, check_onnx, export_command, padded_copy  # noqa: E402
from ddp_seq.config import Config, to_dict  # noqa: E402
from ddp_seq.data.readers.encoding import Encoding  # noqa: E402
from ddp_seq.errors import UserError  # noqa: E402
from ddp_seq.train.checkpoint import save_atomic  # noqa: E402

VOCAB = ["<pad>", "<unk>", *"abcdefghij"]
CLASSES = ["B-x", "I-x", "O"]


def make_checkpoint(path: Path, task: str, cell: str, bidirectional: bool, tokens: bool, pooling: str = "last",
                    layers: int = 1, execution: str = "padded", seed: int = 0, encoding: Encoding | None = None,
                    **data: str) -> Path:
    """A checkpoint as the trainer writes one: config, weights and ``checkpoint_extra`` (encoding included).

    ``encoding``: default VOCAB (tokens) or 4 features, and CLASSES; ``data``: ``cfg.data`` keys (format, ...).
    """
    cfg = Config()
    cfg.data.task, cfg.training.monitor = task, "val_loss"
    for key, value in data.items():
        setattr(cfg.data, key, value)
    cfg.model.cell, cfg.model.bidirectional, cfg.model.pooling = cell, bidirectional, pooling
    cfg.model.hidden, cfg.model.embedding_dim, cfg.model.layers, cfg.model.execution = 8, 8, layers, execution
    if encoding is None:
        encoding = Encoding(VOCAB if tokens else None, None if task == "regress" else CLASSES, 0 if tokens else 4)
    parts = DataParts(None, None, encoding.num_features, encoding.num_outputs(task), encoding.vocab_size,
                      encoding.state_dict())
    torch.manual_seed(seed)
    model = build_model(cfg, parts)
    return save_atomic({"model": model.state_dict(), "config": to_dict(cfg), "extra": checkpoint_extra(parts),
                        "sampler": {"version": 1, "epoch": 1, "position": 0},
                        "train_state": {"version": 2, "step": 4, "history": [{"val_loss": 1.0}]}}, path)


def batch(tokens: bool, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs of ``lengths`` (token ids or 4 features a step), zero-padded, drawn apart from export's."""
    g = torch.Generator().manual_seed(1000 + seed)
    size, longest = len(lengths), max(lengths)
    x = torch.randint(1, len(VOCAB), (size, longest), generator=g) if tokens else torch.randn(size, longest, 4,
                                                                                           generator=g)
    for row, n in enumerate(lengths):
        x[row, n:] = 0
    return x, torch.tensor(lengths)


def max_diff(path: Path, model: torch.nn.Module, task: str, tokens: bool) -> float:
    """The largest |onnxruntime - PyTorch| over batches of sizes and time lengths the export never saw
    (batch 6 with lengths 1..13, batch 1 of length 1, batch 2 of length 20), valid steps only for tag;
    asserts the tolerance on each."""
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for seed, lengths in enumerate(([13, 1, 6, 2, 13, 9], [1], [20, 3])):
        x, n = batch(tokens, lengths, seed)
        with torch.no_grad():
            expected = model(x, n).numpy()
        got = session.run(["outputs"], {"inputs": x.numpy(), "lengths": n.numpy()})[0]
        assert got.shape == expected.shape
        if task == "tag":  # padded steps are not outputs of the model: compare valid steps only
            valid = np.arange(max(lengths))[None, :] < n.numpy()[:, None]
            got, expected = got[valid], expected[valid]
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def export_and_compare(tmp_path: Path, task: str, cell: str, bidirectional: bool, tokens: bool, pooling: str = "last",
                       layers: int = 1, execution: str = "padded") -> tuple[onnx.ModelProto, float]:
    ckpt = make_checkpoint(tmp_path / "best.pt", task, cell, bidirectional, tokens, pooling, layers, execution)
    out = tmp_path / "model.onnx"
    start = time.perf_counter()
    result = export_command(str(ckpt), str(out))
    seconds = time.perf_counter() - start
    model, cfg, _ = model_from_checkpoint(ckpt)  # the model as trained: its own execution path
    assert model.execution == execution
    worst = max_diff(out, model.eval(), task, tokens)
    print(f"{task} {cell} {'bi' if bidirectional else 'uni'} {'tokens' if tokens else 'features'} {pooling}: "
          f"export {seconds:.1f} s, max abs diff {worst:.2g} (export's own check {result.max_abs_diff:.2g})")
    proto = onnx.load(str(out))
    assert result.opset == OPSET and {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    # dynamic axes, named; the output's shape follows the task
    assert dims(proto.graph.input[0]) == (["batch", "time"] if tokens else ["batch", "time", 4])
    assert dims(proto.graph.input[1]) == ["batch"]
    want = {"classify": ["batch", 3], "regress": ["batch"], "tag": ["batch", "time", 3]}[task]
    assert [i.name for i in proto.graph.input] == ["inputs", "lengths"] and dims(proto.graph.output[0]) == want
    return proto, worst


def test_packed_and_padded_paths_agree_so_either_checkpoint_exports_the_padded_one(tmp_path):
    """The exported copy runs the padded path; a packed-trained model gives the same outputs (torch only)."""
    for task in ("classify", "regress", "tag"):
        ckpt = make_checkpoint(tmp_path / f"{task}.pt", task, "lstm", True, tokens=True, pooling="mean", layers=2,
                               execution="packed")
        model, _, _ = model_from_checkpoint(ckpt)
        copy = padded_copy(model)
        assert model.rnn.execution == "packed" and copy.rnn.execution == "padded"
        x, n = batch(True, [9, 1, 4, 9], seed=0)
        with torch.no_grad():
            a, b = model.eval()(x, n), copy(x, n)
        if task == "tag":
            valid = torch.arange(9)[None, :] < n[:, None]
            a, b = a[valid], b[valid]
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_export_bidirectional_lstm_tagger_trained_packed_on_tokens(tmp_path):
    out = tmp_path / "model.onnx"
    out.write_text("an older export")  # replaced whole, as predict replaces its output
    proto, worst = export_and_compare(tmp_path, "tag", "lstm", True, tokens=True, layers=2, execution="packed")
    assert worst <= ATOL
    ops = {node.op_type for node in proto.graph.node}
    assert "LSTM" in ops and "Loop" not in ops  # native recurrent nodes over a dynamic time axis
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["ddp_seq.vocab"]) == VOCAB and json.loads(meta["ddp_seq.classes"]) == CLASSES
    assert meta["ddp_seq.task"] == "tag" and meta["ddp_seq.inputs"] == "tokens"
    assert json.loads(meta["ddp_seq.trained"])["step"] == 4
    assert not any(key.startswith("ddp_seq.tokenizer") for key in meta)  # synthetic data: no text was ever cut
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "model.onnx"]  # no temporary file left


@pytest.fixture(scope="module")
def gru_classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, onnx.ModelProto]:
    """The GRU classifier on features, exported and compared once (its directory: best.pt, model.onnx):
    its own test reads the graph, and the check's test hands it another model (one export fewer)."""
    tmp = tmp_path_factory.mktemp("gru-classifier")
    return tmp, export_and_compare(tmp, "classify", "gru", False, tokens=False, pooling="mean")[0]


def test_export_gru_classifier_on_features(gru_classifier):
    proto = gru_classifier[1]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["ddp_seq.vocab"]) is None and meta["ddp_seq.inputs"] == "features"
    assert json.loads(meta["ddp_seq.num_features"]) == 4
    assert not any(key.startswith("ddp_seq.tokenizer") for key in meta)


# Every task with every cell and direction (but the two cases above); token and feature inputs alternate
# so that each task and each cell/direction meets both, and the poolings cycle over classify and regress.
CASES = [(task, cell, bi, (t + c + bi) % 2 == 0)
         for t, task in enumerate(("classify", "regress", "tag")) for c, cell in enumerate(("lstm", "gru"))
         for bi in (False, True) if (task, cell, bi) not in (("tag", "lstm", True), ("classify", "gru", False))]
MATRIX = [(*case, ("last", "mean", "max")[i % 3]) for i, case in enumerate(CASES)]


@pytest.mark.slow
@pytest.mark.parametrize("task,cell,bidirectional,tokens,pooling", MATRIX, ids=[
    f"{t}-{c}-{'bi' if b else 'uni'}-{'tok' if k else 'feat'}-{p}" for t, c, b, k, p in MATRIX])
def test_export_matrix(tmp_path, task, cell, bidirectional, tokens, pooling):
    export_and_compare(tmp_path, task, cell, bidirectional, tokens, pooling)


def test_the_check_refuses_a_graph_that_computes_something_else(gru_classifier, tmp_path):
    """check_onnx is what stops a wrong export from being written: another model's graph fails it.
    The graph is the GRU classifier's export (to_onnx's bytes, with the metadata), ``b`` the same
    architecture with other weights."""
    exported, _ = gru_classifier
    a = model_from_checkpoint(exported / "best.pt")[0]
    b = model_from_checkpoint(make_checkpoint(tmp_path / "b.pt", "classify", "gru", False, False, "mean", seed=1))[0]
    graph = (exported / "model.onnx").read_bytes()
    assert check_onnx(graph, a, "classify", 0, 4) <= ATOL
    refused = r"^onnxruntime's outputs differ from the model's by up to .*; nothing written$"
    with pytest.raises(UserError, match=refused):
        check_onnx(graph, b, "classify", 0, 4)


def doc_recipe(onnx_path: str, texts: list[str]) -> tuple[list[str], np.ndarray]:
    """docs/export.md's subword example, as it is there (onnxruntime and tokenizers only): labels and logits."""
    import onnxruntime as ort
    import tokenizers

    session = ort.InferenceSession(onnx_path)
    meta = session.get_modelmeta().custom_metadata_map
    vocab, classes = json.loads(meta["ddp_seq.vocab"]), json.loads(meta["ddp_seq.classes"])
    model_id = {token: i for i, token in enumerate(vocab)}  # the tokenizer's own id -> the model's id

    tokenizer = tokenizers.Tokenizer.from_str(meta["ddp_seq.tokenizer_data"])  # ddp_seq.tokenizer_kind: tokenizers
    ids = [[model_id.get(i, 1) for i in tokenizer.encode(text, add_special_tokens=False).ids]  # 1 = <unk>
           for text in texts]
    lengths = np.array([len(row) for row in ids], dtype=np.int64)  # each >= 1
    inputs = np.zeros((len(ids), lengths.max()), dtype=np.int64)  # 0 = <pad>
    for row, seq in enumerate(ids):
        inputs[row, :len(seq)] = seq
    logits = session.run(["outputs"], {"inputs": inputs, "lengths": lengths})[0]
    assert (inputs == 1).any() and len(set(lengths.tolist())) > 1  # the test's texts: unknown ids, mixed lengths
    return [classes[k] for k in logits.argmax(-1)], logits


def test_the_docs_subword_recipe_gives_what_predict_gives(tmp_path, capsys):
    """A tsv model cut by a tokenizer.json trained here: the tokenizer travels in the metadata, and
    docs/export.md's recipe (onnxruntime + tokenizers, no ddp_seq) gives predict's labels and probabilities."""
    import base64

    tokenizers = pytest.importorskip("tokenizers")
    from ddp_seq.cli.export import metadata_of
    from ddp_seq.data.readers.tokenizers import SubwordTokenizer

    trained = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    trained.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trained.train_from_iterator(["low lower lowest", "new newer newest", "wide wider widest"] * 20,
                                tokenizers.trainers.BpeTrainer(vocab_size=40, special_tokens=["[UNK]"]))
    subword = SubwordTokenizer("tokenizers", trained.to_str())
    # the model's vocabulary: the ids of the training text only, so the ids of "wide..." are <unk>
    seen = sorted({i for text in ("low lower lowest", "new newer newest") for i in trained.encode(text).ids})
    encoding = Encoding(["<pad>", "<unk>", *seen], ["neg", "pos"], 0, tokenizer=subword.state_dict())
    (tmp_path / "train.tsv").write_text("neg\tlow lower lowest\npos\tnew newer newest\n")
    ckpt = make_checkpoint(tmp_path / "best.pt", "classify", "gru", False, True, encoding=encoding, format="tsv",
                           train_path=str(tmp_path / "train.tsv"),
                           tokenizer=str(tmp_path / "gone.json"))  # predict and export use the stored one
    out = tmp_path / "model.onnx"
    export_command(str(ckpt), str(out))
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["ddp_seq.tokenizer"] == str(tmp_path / "gone.json") and meta["ddp_seq.tokenizer_kind"] == "tokenizers"
    assert "ddp_seq.tokenizer_applies_to" not in meta  # tsv: always text

    texts = ["lowest newer", "low", "widest wider new", "newest lower low new"]
    (tmp_path / "new.tsv").write_text("".join(f"\t{text}\n" for text in texts))
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "new.tsv"),
                 "--output", str(tmp_path / "pred.jsonl")]) == 0
    capsys.readouterr()
    predicted = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    labels, logits = doc_recipe(str(out), texts)
    assert labels == [p["prediction"] for p in predicted]
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.array([[p["probabilities"][c] for c in ("neg", "pos")] for p in predicted])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)  # predict rounds to 6 decimals

    # a sentencepiece model travels as base64 of its bytes (no export needed to see the key)
    cfg = Config()
    cfg.data.format, cfg.data.tokenizer = "tsv", "spm.model"
    proto = bytes(range(256))
    meta = metadata_of({"vocab_size": 5}, cfg, Encoding(["<pad>", "<unk>", 7, 3, 12], CLASSES, 0,
                                                        tokenizer={"kind": "sentencepiece", "data": proto}))
    assert meta["ddp_seq.tokenizer_kind"] == "sentencepiece"
    assert base64.b64decode(meta["ddp_seq.tokenizer_data"]) == proto


@pytest.mark.parametrize("fmt,tokenizer,vocab,written", [
    ("tsv", "char", VOCAB, {"ddp_seq.tokenizer": "char"}),
    ("tsv", "whitespace", ["<pad>", "<unk>", "good", "film"], {"ddp_seq.tokenizer": "whitespace"}),
    # parquet / hf: a string column is cut, a column of token lists is not, and the checkpoint does not say which
    ("parquet", "char", VOCAB, {"ddp_seq.tokenizer": "char", "ddp_seq.tokenizer_applies_to": "string input columns"}),
    ("hf", "whitespace", ["<pad>", "<unk>", "good"],
     {"ddp_seq.tokenizer": "whitespace", "ddp_seq.tokenizer_applies_to": "string input columns"}),
    # ... unless the vocabulary shows it: integer token ids, or tokens char would never cut
    ("parquet", "char", ["<pad>", "<unk>", 101, 7], {}),
    ("hf", "char", ["<pad>", "<unk>", "good", "film"], {}),
    ("parquet", "whitespace", ["<pad>", "<unk>", "New York"], {}),
    # formats that never read text: their tokens came as lists
    ("jsonl", "char", VOCAB, {}),
    ("jsonl", "char", ["<pad>", "<unk>", 5, 9], {}),
    ("npz", "char", ["<pad>", "<unk>", 5, 9], {}),
    ("synthetic", "char", VOCAB, {}),
    ("ts", "char", None, {}),
    ("tsv", "char", None, {}),  # features: no vocabulary, nothing to cut
])
def test_the_tokenizer_is_named_only_where_it_cut_the_training_text(fmt, tokenizer, vocab, written):
    from ddp_seq.cli.export import metadata_of

    cfg = Config()
    cfg.data.format, cfg.data.tokenizer = fmt, tokenizer
    encoding = Encoding(vocab, CLASSES, 0 if vocab else 4)
    meta = metadata_of({}, cfg, encoding)
    assert {k: v for k, v in meta.items() if k.startswith("ddp_seq.tokenizer")} == written
    assert meta["ddp_seq.vocab"] == json.dumps(vocab)


def test_data_target_models_name_no_tokenizer():
    from ddp_seq.cli.export import metadata_of

    cfg = Config()
    cfg.data.format, cfg.data.target = "tsv", "my_data.py:load"  # data.format is ignored when data.target is set
    assert not any(k.startswith("ddp_seq.tokenizer") for k in metadata_of({}, cfg, Encoding(VOCAB, CLASSES, 0)))


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ddp-seq: error: ")
    return lines[0][len("ddp-seq: error: "):]


def test_bad_inputs_get_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "best.pt", "classify", "gru", False, True)
    out = tmp_path / "model.onnx"
    cases = [
        (["--checkpoint", str(tmp_path / "nope.pt"), "--output", str(out)],
         f"{tmp_path / 'nope.pt'}: checkpoint not found"),
        (["--checkpoint", str(ckpt), "--format", "tflite", "--output", str(out)],
         "--format tflite: unknown; the formats are onnx"),
        (["--checkpoint", str(ckpt), "--output", str(tmp_path / "no" / "m.onnx")],
         f"--output {tmp_path / 'no' / 'm.onnx'}: directory {tmp_path / 'no'} does not exist"),
        (["--checkpoint", str(ckpt), "--output", str(tmp_path)],
         f"--output {tmp_path}: is a directory; give a file name such as model.onnx"),
    ]
    broken = tmp_path / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:200])
    cases.append((["--checkpoint", str(broken), "--output", str(out)],
                  f"{broken}: not a loadable ddp_seq checkpoint: truncated or corrupt"))
    for args, expected in cases:
        assert main(["export", *args]) == 2
        assert one_error_line(capsys).startswith(expected)
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if the package were not installed
    assert main(["export", "--checkpoint", str(ckpt), "--output", str(out)]) == 2
    assert one_error_line(capsys) == "--format onnx needs the onnxscript package: pip install 'ddp-seq[onnx]'"
    assert not out.exists()


USER_MODEL = '''
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class Packed(nn.Module):
    """Runs nn.GRU on a PackedSequence: fine in PyTorch, not traceable by torch.export."""

    def __init__(self, vocab_size, num_outputs):
        super().__init__()
        self.embed, self.rnn = nn.Embedding(vocab_size, 8), nn.GRU(8, 8, batch_first=True)
        self.head = nn.Linear(8, num_outputs)

    def forward(self, inputs, lengths):
        packed = pack_padded_sequence(self.embed(inputs), lengths.cpu(), batch_first=True, enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])
'''


def test_a_user_model_that_does_not_export_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "user_model.py").write_text(USER_MODEL)
    monkeypatch.chdir(tmp_path)
    cfg = Config()
    cfg.model.target = "user_model.py:Packed"
    encoding = Encoding(VOCAB, CLASSES, 0)
    parts = DataParts(None, None, 0, 3, len(VOCAB), encoding.state_dict())
    model = build_model(cfg, parts)
    ckpt = save_atomic({"model": model.state_dict(), "config": to_dict(cfg), "extra": checkpoint_extra(parts)},
                       tmp_path / "user.pt")
    assert main(["export", "--checkpoint", str(ckpt), "--output", "m.onnx"]) == 2  # not trusted
    assert "model.target=user_model.py:Packed" in one_error_line(capsys)
    assert main(["export", "--checkpoint", str(ckpt), "--output", "m.onnx", "--trust-target"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("model.target: user_model.py:Packed does not export to ONNX (") and "FakeTensor" in line
    assert line.endswith("(no pack_padded_sequence, no Python values read from tensors)"), line
    assert not (tmp_path / "m.onnx").exists()
