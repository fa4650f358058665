"""LeX's extrapolation protocol: the same token positions scored at every length, each loss equal to a
plain forward pass over that chunk; and `longctx eval`'s arguments and errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longctx.cli import main
from longctx.data.packing import TokenStream
from longctx.eval.extrapolation import blockwise_block, evaluation_documents, extrapolation, score_length, windows
from longctx.models import LongctxConfig, LongctxForCausalLM, LongctxForMaskedLM


def _decoder(position="rope", **kw):
    torch.manual_seed(0)
    cfg = LongctxConfig(vocab_size=261, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, causal=True,
                        norm="pre", position=position, attention="full", max_position_embeddings=64, **kw)
    return LongctxForCausalLM(cfg).eval()


@pytest.mark.parametrize("T,n,stride", [(48, 16, None), (50, 16, None), (48, 48, None), (37, 64, None),
                                        (48, 16, 4), (50, 16, 16), (48, 20, 7)])
def test_windows_score_every_target_once_with_at_most_n_inputs(T, n, stride):
    seen = []
    for w in windows(T, n, stride):
        assert 0 < w.length <= n and w.start < w.first <= w.stop - 1
        assert w.first - 1 >= w.start  # the first target's previous token is an input of the window
        seen += range(w.first, w.stop)
    assert seen == list(range(1, T + 1))
    if stride:  # after the first window, every target sees at least n - stride + 1 tokens
        assert all(t - w.start >= n - stride + 1 for w in windows(T, n, stride)[1:] for t in range(w.first, w.stop))


def test_two_lengths_score_the_identical_set_of_positions_and_match_a_plain_forward():
    model = _decoder()
    torch.manual_seed(1)
    docs = torch.randint(0, 256, (3, 49)).numpy()  # 3 documents, T = 48 scored tokens each
    by_length = {n: score_length(model, docs, n, batch_size=4) for n in (16, 48)}
    sliding = score_length(model, docs, 32, stride=8, batch_size=4)
    expected = {(d, t) for d in range(3) for t in range(1, 49)}
    for nll in [*by_length.values(), sliding]:
        assert {tuple(p) for p in (~torch.isnan(nll)).nonzero().tolist()} == expected
    # each loss is the plain cross-entropy of a forward pass over that chunk alone (the oracle)
    x = torch.from_numpy(docs)
    with torch.no_grad():
        for n, nll in by_length.items():
            for j in range(0, 48, n):
                logits = model(x[:, j:j + n]).logits
                ref = F.cross_entropy(logits.transpose(1, 2), x[:, j + 1:j + n + 1], reduction="none").double()
                torch.testing.assert_close(nll[:, j + 1:j + n + 1], ref, rtol=1e-5, atol=1e-6)
    # more context changes the losses (the evaluation is not scoring the same chunk twice)
    assert not torch.allclose(by_length[16], by_length[48], equal_nan=True)


def test_documents_are_first_T_plus_1_tokens_of_long_enough_documents_else_stream_pieces():
    ids = np.arange(100, dtype=np.int64) % 250
    # three documents of 30, 10 and 57 tokens (+ a separator each)
    starts = np.array([0, 31, 42])
    stream = TokenStream(ids, np.zeros(100, bool), starts)
    docs, unit = evaluation_documents(stream, 20)
    assert unit == "documents" and docs.tolist() == [ids[0:21].tolist(), ids[42:63].tolist()]
    docs, unit = evaluation_documents(stream, 40)  # only one document is that long: pieces of the stream
    assert unit == "stream pieces" and docs.tolist() == [ids[0:41].tolist(), ids[41:82].tolist()]


def test_learned_positions_beyond_the_table_are_not_applicable_and_blockwise_is_half_the_training_length():
    stream = TokenStream(np.arange(400) % 250, np.zeros(400, bool), np.array([0, 200]))
    res = extrapolation(_decoder("learned"), stream, [32, 64, 128], tokens=128, bits_per_char=True)
    rows = {r["length"]: r for r in res["rows"]}
    assert rows[128] == {"length": 128, "skipped": "learned positions end at 64"}
    assert rows[32]["scored_tokens"] == rows[64]["scored_tokens"] == 2 * 128
    assert rows[32]["bits_per_char"] == pytest.approx(rows[32]["loss"] / np.log(2))
    assert blockwise_block(512) == 256


# --- the command -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "attention", "window", "token", "length"]
    for i in range(40):
        (corpus / f"d{i:02}.txt").write_text(" ".join(rng.choice(words, 60)))
    run = root / "run"
    _decoder().save_pretrained(run / "model")
    (run / "results.json").write_text(json.dumps({"seq_len": 32}))
    torch.manual_seed(0)
    mlm = LongctxForMaskedLM(LongctxConfig(vocab_size=261, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, window=4, max_position_embeddings=64))
    mlm.save_pretrained(root / "mlm")
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))


def _data(saved):
    return [f"data.corpus={saved / 'corpus'}", "data.tokenizer=bytes", "data.valid_fraction=0.2"]


def test_config_before_or_after_overrides_gives_the_same_rows(saved, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {seq_len: 32}\n")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    model = str(saved / "run" / "model")
    assert main(["eval", model, "--config", str(cfg), *_data(saved), "--lengths", "16,32", "--json", str(a)]) == 0
    assert main(["eval", model, *_data(saved), "--config", str(cfg), "--lengths", "16,32", "--json", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra == rb and [r["length"] for r in ra] == [16, 32] and ra[0]["scored_tokens"] == ra[1]["scored_tokens"]


def test_blockwise_with_no_value_uses_half_the_training_length(saved, tmp_path, capsys):
    out = tmp_path / "b.json"
    # an override right after the bare flag is an override, not a block size
    assert main(["eval", str(saved / "run" / "model"), "--blockwise", *_data(saved), "--lengths", "64",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["blockwise"] == 16  # trained at 32 (results.json)
    assert "blocks of 16" in capsys.readouterr().out


@pytest.mark.parametrize("argv,words", [
    (["--lengths", "abc"], "--lengths 'abc' must be comma-separated positive integers"),
    (["--json", "{tmp}"], "is a folder"),
    (["--blockwise", "0"], "--blockwise '0' must be a positive block size"),
    (["--resolution"], "--resolution applies to causal LMs"),
])
def test_bad_arguments_get_one_sentence_and_exit_2(saved, tmp_path, capsys, argv, words):
    model = saved / ("mlm" if "--resolution" in argv else "run/model")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    capsys.readouterr()
    assert main(["eval", str(model), *_data(saved), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_comparison_with_an_extrapolation_section_reports_positions_by_lengths(saved, tmp_path):
    import yaml
    base = {"objective": "clm", "data": {"corpus": str(saved / "corpus"), "tokenizer": "bytes", "seq_len": 32,
                                         "valid_fraction": 0.2},
            "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "attention": "full",
                      "norm": "pre", "max_position_embeddings": 128},
            "train": {"steps": 2, "batch_size": 2, "save_every": 0, "log_every": 1, "eval_batches": 1}}
    cfg = tmp_path / "lex.yaml"
    cfg.write_text(yaml.safe_dump({"name": "lex", "base": base, "variants": [
        {"name": "learned", "set": {"model.position": "learned", "model.max_position_embeddings": 32}},
        {"name": "xpos", "set": {"model.position": "xpos"}}],
        "extrapolation": {"multiples": [1, 2], "tokens": 64, "max_docs": 4}}))
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "runs"), "--quiet"]) == 0
    run = tmp_path / "runs" / "lex"
    variants = {v["variant"]: v["extrapolation"] for v in json.loads((run / "results.json").read_text())["variants"]}
    assert set(variants["learned"]["runs"]) == {"plain"}  # blockwise applies to relative positions only
    assert variants["xpos"]["runs"]["blockwise"]["blockwise"] == 16  # half the training length
    learned = {r["length"]: r for r in variants["learned"]["runs"]["plain"]["rows"]}
    assert "skipped" in learned[64] and learned[32]["scored_tokens"] == 4 * 64
    for run_ in variants["xpos"]["runs"].values():
        assert [r["scored_tokens"] for r in run_["rows"]] == [4 * 64, 4 * 64]
        assert all("attention_resolution" in r for r in run_["rows"])
    report = (run / "report.md").read_text()
    assert "| learned | causal |" in report and "| n/a |" in report and "blockwise causal, block 16" in report
    assert (run / "perplexity_vs_length.png").exists()
    with pytest.raises(Exception, match="unknown keys"):
        from longctx.experiments.compare import load_comparison
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"base": base, "variants": [{"name": "a"}], "extrapolation": {"lenghts": [1]}}))
        load_comparison(bad, [])


@pytest.mark.slow
def test_longformer_charlm_ablations_run_on_a_text8_style_file_and_report_dev_bpc(tmp_path):
    """A tiny version of a recipe (dilation on/off) on a text8-format file (one line of lowercase letters
    and spaces): the file is split by position and every variant reports dev bits per character. The
    windows recipe is checked to load (its variants are the same kind of run)."""
    from pathlib import Path

    from longctx.experiments.compare import load_comparison, run_comparison
    rng = np.random.default_rng(0)
    words = ["anarchism", "originated", "as", "a", "term", "of", "abuse", "first", "used", "against"]
    text8 = tmp_path / "text8"
    text8.write_text(" ".join(rng.choice(words, 6000)))  # no newline, like text8
    tiny = [f"data.corpus={text8}", "data.seq_len=300", "model.hidden_size=16", "model.num_attention_heads=4",
            "model.max_position_embeddings=300", "train.steps=2", "train.batch_size=2", "train.eval_batches=2",
            "train.save_every=0"]
    configs = Path(__file__).parents[1] / "configs"
    windows = load_comparison(configs / "longformer-charlm-windows.yaml", tiny)
    assert [v["config"]["model"]["window"] for v in windows["variants"]] == [
        [16, 32, 64, 128], [128, 64, 32, 16], [60, 60, 60, 60]]
    comp = load_comparison(configs / "longformer-charlm-dilation.yaml", tiny)
    summary = run_comparison(comp, tmp_path / "runs", progress=False)
    assert len(summary["variants"]) == len(comp["variants"]) >= 2
    for v in summary["variants"]:
        assert 0 < v["eval"]["bits_per_char"] < 20
    assert "bits/char" in (tmp_path / "runs" / comp["name"] / "report.md").read_text()


@pytest.mark.parametrize("position", ["sinusoidal", "alibi"])
def test_a_saved_model_with_fixed_position_tables_evaluates_as_it_was_trained(position, tmp_path):
    """from_pretrained leaves the non-persistent sinusoidal table and ALiBi slopes uninitialised;
    load_model refills them."""
    from longctx.eval.extrapolation import load_model
    model = _decoder(position)
    model.save_pretrained(tmp_path / "m")
    x = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m")(x).logits, model(x).logits)
