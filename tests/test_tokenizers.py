"""Subword tokenizers (``data.tokenizer`` = a ``tokenizer.json`` or a sentencepiece ``.model``).

Every tokenizer is trained here, in the test, on a small corpus (Hugging Face ``tokenizers``' BPE and
WordPiece trainers, sentencepiece's trainer), so nothing is downloaded. The readers' ids and lengths
are checked against the library's own ``encode`` of each text; the encoding, tokenizer included,
round-trips through ``torch.save`` and ``torch.load(weights_only=True)``; ``evaluate``/``predict``
data is cut by the stored tokenizer even after the file is deleted or replaced; bad files are one
line. One slow test trains a tiny model in this process, deletes the tokenizer file and predicts.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddp_seq.builders import encoding_of, model_from_checkpoint
from ddp_seq.cli import main
from ddp_seq.config import ConfigError, DataConfig, load_config
from ddp_seq.data.readers.encoding import PAD, SPECIALS, UNK, Encoding
from ddp_seq.data.readers.sources import load_eval_data, load_inputs, load_splits, read_raw
from ddp_seq.data.readers.text import read_tsv, tokenize_texts
from ddp_seq.data.readers.tokenizers import SubwordTokenizer, load_tokenizer, trained_tokenizer
from ddp_seq.errors import UserError
from ddp_seq.train.checkpoint import check_encoding

tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

ERROR_PREFIX = "ddp-seq: error:"
KINDS = ("bpe", "wordpiece", "sentencepiece")
WORDS = ("the", "coffee", "café", "was", "really", "great", "awful", "crème", "brûlée", "service", "cold", "fresh",
         "and", "but", "waiter", "très", "soggy", "lovely")
# Texts the tokenizers never saw: unknown characters, an empty text, runs of spaces, a tab inside.
ODD = ["", "zzz qqq ✓", "the   café\twas", "ÉTÉ ß 漢字", "great"]


def sentences(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))) for _ in range(n)]


CORPUS = sentences(0, 300)


def train_hf(kind: str, path: Path, *, bert_like: bool = False) -> Path:
    """A tiny BPE or WordPiece ``tokenizer.json``; ``bert_like``: [CLS]/[SEP] added by a post-processor,
    padding and truncation switched on in the file (ddp_seq must ignore all three)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
                                      show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trainer = trainers.WordPieceTrainer(vocab_size=90, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"],
                                            show_progress=False)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainer)
    if bert_like:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                     ("[SEP]", tok.token_to_id("[SEP]"))])
        tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=64)
        tok.enable_truncation(max_length=3)
    tok.save(str(path))
    return path


def train_spm(path: Path, seed: int = 0) -> Path:
    """A tiny sentencepiece unigram model, trained in memory and written to ``path``."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(seed, 300)), model_writer=model, vocab_size=40,
                                   normalization_rule_name="identity", minloglevel=2)
    path.write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tokenizers")
    return {"bpe": train_hf("bpe", base / "bpe.json"), "wordpiece": train_hf("wordpiece", base / "wp.json"),
            "sentencepiece": train_spm(base / "sp.model"), "bert_like": train_hf("bpe", base / "bert.json",
                                                                                 bert_like=True)}


def library_ids(kind: str, path: Path, text: str) -> list[int]:
    """The library's own ids of ``text``, one text at a time, no special tokens."""
    if kind == "sentencepiece":
        return spm.SentencePieceProcessor(model_file=str(path)).encode(text)
    return tokenizers.Tokenizer.from_file(str(path)).encode(text, add_special_tokens=False).ids


def as_lists(ids: np.ndarray, symbols: list, lengths: list[int]) -> list[list[int]]:
    """Per-text token ids back from tokenize_texts' (ids, symbols, lengths)."""
    tokens = [symbols[i] for i in ids.tolist()]
    bounds = np.cumsum([0, *lengths])
    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def write_tsv(path: Path, texts: list[str], labelled: bool = True) -> Path:
    lines = [f"{'pos' if 'great' in t or 'lovely' in t else 'neg'}\t{t}" if labelled else t for t in texts]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- the readers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_tokenize_texts_gives_the_library_ids_and_lengths(files, kind):
    texts = [*sentences(1, 40), *ODD]
    tokenizer = SubwordTokenizer.from_file(files[kind])
    ids, symbols, lengths = tokenize_texts("t.tsv", texts, tokenizer)
    expected = [library_ids(kind, files[kind], t) for t in texts]
    assert ids.dtype == np.int64 and lengths == [len(e) for e in expected]
    assert as_lists(ids, symbols, lengths) == expected
    assert symbols == sorted(set(symbols)) and all(type(s) is int for s in symbols)  # file-local: the ids seen
    assert lengths[ODD.index("") + 40] == 0  # an empty text has no tokens (data.empty decides)
    # A path is loaded (once per process) and gives the same.
    by_path = tokenize_texts("t.tsv", texts, str(files[kind]))
    assert by_path[0].tolist() == ids.tolist() and by_path[1:] == (symbols, lengths)
    assert load_tokenizer(str(files[kind])) is load_tokenizer(str(files[kind]))


def test_batches_larger_than_one_library_call_keep_their_order(files, monkeypatch):
    import ddp_seq.data.readers.tokenizers as module

    monkeypatch.setattr(module, "_CHUNK", 7)  # 45 texts: 7 calls, the last one short
    texts = [*sentences(2, 40), *ODD]
    ids, lengths = SubwordTokenizer.from_file(files["bpe"]).encode_batch(texts)
    expected = [library_ids("bpe", files["bpe"], t) for t in texts]
    assert lengths.tolist() == [len(e) for e in expected]
    assert ids.tolist() == [i for e in expected for i in e]


def test_no_special_tokens_and_the_files_padding_and_truncation_are_ignored(files):
    texts = ["the coffee was great and the service was lovely", "café", ""]
    ids, symbols, lengths = tokenize_texts("t.tsv", texts, SubwordTokenizer.from_file(files["bert_like"]))
    file_says = tokenizers.Tokenizer.from_file(str(files["bert_like"]))
    assert [len(e.ids) for e in file_says.encode_batch(texts)] == [64, 64, 64]  # what the file alone would do
    special = {file_says.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")}
    assert not special & set(symbols)
    file_says.no_padding()
    file_says.no_truncation()
    assert as_lists(ids, symbols, lengths) == [file_says.encode(t, add_special_tokens=False).ids for t in texts]
    assert lengths[0] > 3  # not cut to the file's max_length=3


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_read_tsv_and_read_raw_cut_the_text_column(files, kind, tmp_path):
    texts = sentences(3, 30)
    path = write_tsv(tmp_path / "t.tsv", texts)
    parsed = read_tsv(str(path), task="classify", tokenizer=str(files[kind]))
    data = parsed.data
    got = [[parsed.token_symbols[v] for v in data.values[a:b]] for a, b in zip(data.offsets[:-1], data.offsets[1:])]
    assert got == [library_ids(kind, files[kind], t) for t in texts]
    assert data.lines.tolist() == list(range(1, 31))
    cfg = DataConfig(format="tsv", tokenizer=str(files[kind]), train_path=str(path))
    assert read_raw(cfg, str(path)).data.values.tolist() == data.values.tolist()


# -- the encoding and the checkpoint -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_the_vocabulary_comes_from_the_training_split_and_the_tokenizer_round_trips(files, kind, tmp_path):
    train = write_tsv(tmp_path / "train.tsv", sentences(4, 60))
    val = write_tsv(tmp_path / "val.tsv", ["zzz xyz", "the coffee"])
    cfg = DataConfig(format="tsv", tokenizer=str(files[kind]), train_path=str(train), val_path=str(val),
                     min_freq=2)
    splits = load_splits(cfg)
    enc = splits.encoding
    # <pad>, <unk>, then the tokenizer's ids seen >= min_freq times in training, most frequent first.
    counts: dict[int, int] = {}
    for text in sentences(4, 60):
        for i in library_ids(kind, files[kind], text):
            counts[i] = counts.get(i, 0) + 1
    expected = sorted((i for i, c in counts.items() if c >= 2), key=lambda i: (-counts[i], i))
    assert enc.vocab == [*SPECIALS, *expected]
    # The validation text is encoded through that vocabulary: ids training never saw become <unk>.
    index = {t: k for k, t in enumerate(enc.vocab) if k >= 2}
    want = [index.get(i, UNK) for t in ["zzz xyz", "the coffee"] for i in library_ids(kind, files[kind], t)]
    assert splits.val.values.tolist() == want and UNK in want and PAD not in want
    # The tokenizer travels in the encoding: torch.save + torch.load(weights_only=True) give it back.
    buffer = io.BytesIO()
    torch.save({"encoding": enc.state_dict()}, buffer)
    buffer.seek(0)
    back = Encoding.from_state_dict(torch.load(buffer, weights_only=True)["encoding"])
    assert back == enc and back.tokenizer["kind"] == ("tokenizers" if kind != "sentencepiece" else "sentencepiece")
    stored = SubwordTokenizer.from_state_dict(back.tokenizer)
    texts = [*sentences(5, 20), *ODD]
    ids, lengths = stored.encode_batch(texts)
    assert ids.tolist() == [i for t in texts for i in library_ids(kind, files[kind], t)]
    assert lengths.tolist() == [len(library_ids(kind, files[kind], t)) for t in texts]


def test_older_encodings_without_a_tokenizer_still_load():
    old = {"vocab": ["<pad>", "<unk>", "a"], "classes": ["neg", "pos"], "num_features": 0}  # before the field
    enc = Encoding.from_state_dict(old)
    assert enc.tokenizer is None and enc.vocab == old["vocab"]
    check_encoding({"encoding": old}, enc.state_dict(), "old.pt")  # a char/whitespace resume is unaffected


def test_the_stored_tokenizer_does_not_depend_on_the_files_layout(files, tmp_path):
    text = files["bpe"].read_text(encoding="utf-8")
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(text), indent=4, ensure_ascii=False), encoding="utf-8")
    assert SubwordTokenizer.from_file(pretty).state_dict() == SubwordTokenizer.from_file(files["bpe"]).state_dict()
    copy = tmp_path / "copy.model"
    copy.write_bytes(files["sentencepiece"].read_bytes())
    assert SubwordTokenizer.from_file(copy).state_dict() == \
        SubwordTokenizer.from_file(files["sentencepiece"]).state_dict()


def test_a_changed_tokenizer_file_is_refused_at_resume(files, tmp_path):
    path = write_tsv(tmp_path / "t.tsv", sentences(6, 40))
    tok = tmp_path / "tok.model"
    tok.write_bytes(files["sentencepiece"].read_bytes())
    cfg = DataConfig(format="tsv", tokenizer=str(tok), train_path=str(path))
    saved = {"extra": {"encoding": load_splits(cfg).encoding.state_dict()}}
    check_encoding(saved, load_splits(cfg).encoding.state_dict(), "last.pt")  # the same file: resumes
    train_spm(tok, seed=1)  # another model under the same name
    with pytest.raises(UserError) as info:
        check_encoding(saved, load_splits(cfg).encoding.state_dict(), "last.pt")
    assert str(info.value) == ("last.pt: data.tokenizer differs from the tokenizer stored in the checkpoint (the file "
                               "changed, or another tokenizer is named); resume with the tokenizer it was trained with")


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_eval_and_predict_data_are_cut_by_the_stored_tokenizer(files, tmp_path, change):
    tok = tmp_path / "tokenizer.json"
    tok.write_text(files["bpe"].read_text(encoding="utf-8"), encoding="utf-8")
    train, val = write_tsv(tmp_path / "train.tsv", sentences(7, 50)), write_tsv(tmp_path / "val.tsv", sentences(8, 9))
    inputs = write_tsv(tmp_path / "new.tsv", [*sentences(9, 6), "the coffee ✓"], labelled=False)
    cfg = DataConfig(format="tsv", tokenizer=str(tok), train_path=str(train), val_path=str(val))
    held_out = DataConfig(format="tsv", tokenizer=str(tok), train_path=str(train))  # the val_fraction hold-out
    splits, held = load_splits(cfg), load_splits(held_out)
    enc = Encoding.from_state_dict(splits.encoding.state_dict())
    before = load_inputs(cfg, enc, str(inputs))[0]
    if change == "deleted":
        tok.unlink()
    else:  # a WordPiece file under the same name: other ids for the same text
        tok.write_text(files["wordpiece"].read_text(encoding="utf-8"), encoding="utf-8")
    after = load_inputs(cfg, enc, str(inputs))[0]
    assert after.values.tolist() == before.values.tolist() and after.lengths.tolist() == before.lengths.tolist()
    assert load_eval_data(cfg, enc)[0].values.tolist() == splits.val.values.tolist()
    assert load_eval_data(held_out, held.encoding)[0].values.tolist() == held.val.values.tolist()


def test_a_tokenizer_file_for_a_model_trained_on_words_is_refused(files):
    with pytest.raises(UserError, match=r"^data.tokenizer: .*bpe.json: the model was trained without a subword"):
        trained_tokenizer(str(files["bpe"]), None)
    assert trained_tokenizer("whitespace", None) == "whitespace"


def test_a_char_or_whitespace_override_of_a_subword_model_is_refused_not_ignored(files):
    stored = SubwordTokenizer.from_file(str(files["bpe"])).state_dict()
    assert isinstance(trained_tokenizer(str(files["bpe"]), stored), SubwordTokenizer)
    for name in ("char", "whitespace"):
        with pytest.raises(UserError, match=rf"^data.tokenizer={name}: the model was trained with a subword"):
            trained_tokenizer(name, stored)


# -- bad input: one line, exit 2 ----------------------------------------------------------------------

def bad(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name, content, says", [
    ("gone.json", None, "data.tokenizer: {path}: no such file"),
    ("empty.model", b"", "data.tokenizer: {path}: the file is empty, not a sentencepiece file"),
    ("broken.json", b'{"model": ', "data.tokenizer: {path}: not a Hugging Face tokenizers file (EOF while parsing"),
    ("tokenizer_config.json", b'{"do_lower_case": true, "model_max_length": 512}',
     "data.tokenizer: {path}: a JSON file, but not a Hugging Face tokenizers file (no \"model\" key; give the "
     "tokenizer.json that tokenizers' Tokenizer.save writes, not tokenizer_config.json or vocab.json)"),
    ("latin1.json", "{'é'}".encode("latin-1"),
     "data.tokenizer: {path}: not a Hugging Face tokenizers file (not UTF-8 JSON text)"),
    ("text.model", b"this is not a protobuf\n",
     "data.tokenizer: {path}: not a sentencepiece model (INTERNAL: src/sentencepiece_processor.cc"),
])
def test_bad_tokenizer_files_are_one_line(tmp_path, capsys, name, content, says):
    path = tmp_path / name if content is None else bad(tmp_path, name, content)
    with pytest.raises(UserError) as info:
        SubwordTokenizer.from_file(path)
    message = str(info.value)
    assert message.startswith(says.format(path=path)) and "\n" not in message
    # ... and so through the CLI: exit 2, one line, before any run directory exists.
    data = write_tsv(tmp_path / "t.tsv", sentences(10, 8))
    runs = tmp_path / "runs"
    assert main(["train", "data.format=tsv", f"data.train_path={data}", f"data.tokenizer={path}",
                 f"logging.root={runs}", "training.epochs=1", "logging.progress=none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{ERROR_PREFIX} {message}"]
    assert not runs.exists()


@pytest.mark.parametrize("package, suffix", [("tokenizers", "json"), ("sentencepiece", "model")])
def test_a_missing_library_names_the_extra(files, monkeypatch, package, suffix):
    monkeypatch.setitem(sys.modules, package, None)  # what `import` meets when the package is not installed
    path = files["bpe" if suffix == "json" else "sentencepiece"]
    with pytest.raises(UserError) as info:
        SubwordTokenizer.from_file(path)
    assert str(info.value) == (f"data.tokenizer: {path}: reading a {package} file needs the {package} package: "
                               "pip install 'ddp-seq[tokenizers]'")


@pytest.mark.parametrize("fmt", ["jsonl", "npz", "ts", "synthetic"])
def test_a_tokenizer_file_for_a_format_without_text_is_a_config_error(fmt, capsys):
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data.format={fmt}", "data.train_path=d", "data.tokenizer=tok/tokenizer.json"])
    assert str(info.value) == (f"data.tokenizer: tok/tokenizer.json cuts text, which data.format={fmt} does not hold "
                               "(tsv, parquet and hf text columns do); leave data.tokenizer at char")
    load_config(None, [f"data.format={fmt}", "data.train_path=d"])  # the default (char) is fine
    assert main(["train", f"data.format={fmt}", "data.train_path=d", "data.tokenizer=sp.model"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# -- end to end ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_then_predict_raw_text_after_the_tokenizer_file_is_deleted(files, tmp_path, capsys):
    from ddp_seq.data.readers.corpus import write_samples

    samples = write_samples(tmp_path / "samples")
    train = samples["reviews.tsv"]
    texts = [line.split("\t", 1)[1] for line in train.read_text(encoding="utf-8").splitlines()]
    tok = tmp_path / "tokenizer.json"  # trained on the training text, as a user would
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]"], show_progress=False))
    hf.save(str(tok))
    args = ["data.format=tsv", f"data.train_path={train}", f"data.tokenizer={tok}", "data.val_fraction=0.2",
            "model.hidden=16", "model.embedding_dim=8", "model.layers=1", "batching.batch_size=32",
            "training.warmup_steps=5", "logging.progress=none", f"logging.root={tmp_path}/runs", "logging.name=sub"]
    assert main(["train", *args, "training.epochs=1"]) == 0
    checkpoint = tmp_path / "runs/sub/checkpoints/last.pt"
    raw = ["The café was great.", "the coffee was so awful, but the waiter was charming.", "✓✓ unseen ✓✓",
           "Très superb crêpe and lovely terrace.", "the soup was cold"]
    expected = [hf.encode(t, add_special_tokens=False).ids for t in raw]
    inputs = tmp_path / "raw.tsv"
    inputs.write_text("\n".join(raw) + "\n", encoding="utf-8")  # no label column: raw text only
    # Resuming with another tokenizer under the same name is refused (one line, exit 2).
    train_hf("wordpiece", tok)
    capsys.readouterr()
    assert main(["train", *args, "training.epochs=2", f"checkpoint.resume={checkpoint}"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{ERROR_PREFIX} {checkpoint}: data.tokenizer differs from the tokenizer stored in the checkpoint (the file "
        "changed, or another tokenizer is named); resume with the tokenizer it was trained with")
    tok.unlink()  # predict and evaluate need nothing but the checkpoint
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--checkpoint", str(checkpoint), "--input", str(inputs), "--output", str(out)]) == 0
    assert main(["evaluate", "--checkpoint", str(checkpoint)]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["index"] for r in rows] == list(range(len(raw)))
    # Row i is the model's answer for raw text i cut by the tokenizer it was trained with.
    model, cfg, state = model_from_checkpoint(checkpoint)
    enc = encoding_of(state, cfg)
    index = {t: k for k, t in enumerate(enc.vocab) if k >= 2}
    for row, ids in zip(rows, expected):
        steps = torch.tensor([[index.get(i, UNK) for i in ids]])
        with torch.no_grad():
            probs = torch.softmax(model.eval()(steps, torch.tensor([steps.shape[1]])), -1)[0]
        assert row["prediction"] == enc.classes[int(probs.argmax())]
        for c, p in zip(enc.classes, probs.tolist()):
            assert row["probabilities"][c] == pytest.approx(p, abs=1e-5)
