"""The attention dispatcher (attention/dispatch.py, issue 26): its choice for a table of calls is the kernel that
actually runs (each kernel's entry is wrapped to record that it ran), every kernel passed over says why, explicit
requests that cannot run are one sentence, ``LONGCTX_EXPLAIN_ATTENTION=1`` logs each distinct call once, and
``longctx attention-backends`` prints the choice with the reasons (exit 0) or one line for a bad flag (exit 2).

The fused extension's state is simulated (``fused.load`` patched) so that these tests neither build it nor depend
on whether an earlier test did; the fused kernel's stand-in runs the PyTorch band kernel on ``scale * q``."""
from __future__ import annotations

import logging

import pytest
import torch

import longctx.attention  # noqa: F401  (registers the mechanisms)
from longctx.attention import AttentionPattern, LayerContext, SelfAttention, attention, bigbird, build, dispatch
from longctx.attention import functional, fused
from longctx.attention.blocked import band_attention
from longctx.cli import main
from longctx.errors import LongctxError

SLIDING, FULL, BLOCKS = (AttentionPattern("sliding", window=3), AttentionPattern("full"),
                         AttentionPattern("blocks", block=4))


@pytest.fixture
def ran(monkeypatch):
    """The kernels that ran, in order: every kernel entry of attention() and of BigBird's layer, wrapped."""
    log: list[str] = []

    def record(module, attr, name, replacement=None):
        real = getattr(module, attr)

        def wrapper(*a, **kw):
            log.append(name)
            return (replacement or real)(*a, **kw)
        monkeypatch.setattr(module, attr, wrapper)

    def fake_fused(q, k, v, pattern, pos, *, scale=1.0, **kw):  # no extension needed: the same function
        return band_attention(q * scale, k, v, pattern, pos, **kw)

    record(functional, "dense_attention", "dense")
    record(functional, "_sdpa", "sdpa")
    record(functional, "_flex", "flex")
    record(functional, "band_attention", "blocked-torch")
    record(fused, "fused_band_attention", "fused", fake_fused)
    record(bigbird, "dense_attention", "dense")
    record(bigbird._LayoutSteps, "apply", "layout-torch")
    record(bigbird._FusedLayout, "apply", "layout-fused")
    return log


def _extension(monkeypatch, ready: bool):
    """Simulate the extension: loaded (``ready``), or not built yet under LONGCTX_FUSED=prebuilt."""
    monkeypatch.setenv("LONGCTX_FUSED", "prebuilt")
    monkeypatch.setattr(fused, "_state", {"loaded": ready, "why_not": None})
    monkeypatch.setattr(fused, "load", lambda build=True: ready)
    monkeypatch.setattr(fused, "require", lambda: None)
    monkeypatch.setattr(fused, "is_built", lambda: ready)
    monkeypatch.setattr(fused, "compiler_missing", lambda: None)


def _qkv(dtype=torch.float32, B=1, n=20, grad=False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, 2, n, 8, generator=g).to(dtype).requires_grad_(grad) for _ in range(3)]


# (backend, pattern, dtype, extension ready, extra) -> the kernel that runs
TABLE = [
    ("auto", FULL, torch.float32, True, {}, "sdpa"),
    ("auto", SLIDING, torch.float32, True, {}, "fused"),
    ("auto", SLIDING, torch.float32, False, {}, "blocked-torch"),
    ("auto", BLOCKS, torch.bfloat16, True, {}, "fused"),
    ("auto", SLIDING, torch.float16, True, {}, "blocked-torch"),
    ("auto", SLIDING, torch.float64, True, {}, "blocked-torch"),
    ("blocked", FULL, torch.float32, True, {}, "fused"),
    ("blocked", SLIDING, torch.float32, True, {"global": True, "padding": True}, "fused"),
    ("blocked", SLIDING, torch.float32, True, {"empty": True}, "blocked-torch"),
    ("blocked-torch", SLIDING, torch.float32, True, {}, "blocked-torch"),
    ("fused", SLIDING, torch.float32, True, {}, "fused"),
    ("fused", SLIDING, torch.float16, True, {}, "blocked-torch"),  # the extension loads; fp16 falls back
    ("dense", SLIDING, torch.float32, True, {}, "dense"),
    ("sdpa", FULL, torch.float32, True, {"padding": True}, "sdpa"),
    pytest.param("flex", SLIDING, torch.float32, True, {}, "flex", marks=pytest.mark.slow),  # eager flex: seconds
    ("blocked", SLIDING, torch.float32, True, {"score_bias": True}, "dense"),
]


@pytest.mark.parametrize("backend, pattern, dtype, ready, extra, want", TABLE,
                         ids=[f"{b}-{p.kind}-{str(d)[6:]}-{'built' if r else 'unbuilt'}-{'+'.join(e) or 'plain'}"
                              for b, p, d, r, e, _ in (getattr(t, "values", t) for t in TABLE)])
def test_the_choice_is_the_kernel_that_runs(backend, pattern, dtype, ready, extra, want, ran, monkeypatch):
    if backend == "flex" and not dispatch.flex_available():
        pytest.skip("no FlexAttention in this PyTorch")
    _extension(monkeypatch, ready)
    B = 0 if extra.get("empty") else 2
    q, k, v = _qkv(dtype, B=B)
    kw = {}
    if extra.get("padding"):
        kw["key_padding_mask"] = torch.arange(20).expand(B, 20) < 17
    if extra.get("global"):
        kw["global_mask"] = torch.arange(20).expand(B, 20) == 0
    if extra.get("score_bias"):
        kw["score_bias"] = lambda qp, kp: torch.zeros(2, qp.numel(), kp.numel())
    out = attention(q, k, v, pattern, backend=backend, **kw)
    assert out.shape == q.shape
    assert dispatch.last["mask"].kernel == want
    assert ran == [want], ran
    call = dispatch.mask_call(backend, q, pattern, **{k_: v_ for k_, v_ in kw.items()
                                                      if k_ in ("key_padding_mask", "global_mask", "score_bias")})
    assert dispatch.decide(call).kernel == want
    if not (extra.get("empty") and backend == "sdpa"):
        ref = attention(q, k, v, pattern, backend="dense", **kw)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_traced_calls_run_the_pytorch_kernel(ran, monkeypatch):
    _extension(monkeypatch, True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    q, k, v = _qkv(torch.float64)
    attention(q, k, v, SLIDING, backend="blocked")
    assert ran == ["blocked-torch"]
    call = dispatch.mask_call("blocked", q.float(), SLIDING)
    assert call.tracing and any("traced" in r for r in dict(dispatch.decide(call).rejected)["fused"])


def test_fused_off_by_the_environment(ran, monkeypatch):
    _extension(monkeypatch, True)
    monkeypatch.setenv("LONGCTX_FUSED", "0")
    q, k, v = _qkv()
    attention(q, k, v, SLIDING, backend="blocked")
    assert ran == ["blocked-torch"]
    assert dict(dispatch.last["mask"].rejected)["fused"] == ("extension unavailable: turned off (LONGCTX_FUSED=0)",)


@pytest.mark.parametrize("backend, ready, want", [
    ("auto", False, "layout-torch"), ("blocked-torch", True, "layout-torch"), ("dense", True, "dense"),
    ("auto", True, "layout-fused"), ("sdpa", True, "layout-fused")])
def test_bigbird_runs_the_layout_kernel_the_dispatcher_picks(backend, ready, want, ran, monkeypatch):
    _extension(monkeypatch, ready)
    if want == "layout-fused":  # the stand-in for the C++ tiles: record, then refuse (no extension here)
        monkeypatch.setattr(bigbird._FusedLayout, "apply", lambda *a: ran.append("layout-fused") or _Stop.raise_())
    mech = build("bigbird", {"block": 4, "random": 1}, LayerContext(num_heads=2, head_dim=8, max_len=64, backend=backend))
    q, k, v = _qkv()
    try:
        mech(q, k, v)
    except _Stop:
        pass
    assert dispatch.last["layout"].kernel == want
    assert ran == [want], ran


class _Stop(Exception):
    @classmethod
    def raise_(cls):
        raise cls()


def test_an_approximate_family_has_one_kernel():
    layer = SelfAttention(16, 2, {"type": "linformer", "k": 4}, max_len=32)
    layer(torch.randn(1, 20, 16))
    choice = dispatch.last["approx"]
    assert choice.kernel == "linformer" and choice.rejected == ()
    text = dispatch.explain(dispatch.Call("approx", "linformer", "linformer"))
    assert "single kernel" in text and "-> linformer" in text


def test_reasons_for_the_kernels_passed_over(monkeypatch):
    _extension(monkeypatch, False)
    q = torch.zeros(1, 2, 16, 8, dtype=torch.float16, requires_grad=True)
    choice = dispatch.decide(dispatch.mask_call("auto", q, SLIDING))
    assert choice.kernel == "blocked-torch"
    why = dict(choice.rejected)
    assert any("no CPU backward" in r for r in why["flex"]) or any("not in this PyTorch" in r for r in why["flex"])
    assert why["sdpa"] == ("runs the full pattern only, not 'sliding'",)
    assert why["fused"] == ("dtype float16 (takes float32, bfloat16)",)  # the extension is not even probed
    # fp32: the extension is what is missing, and the prebuilt policy says so
    chosen, table = dispatch.rows(dispatch.mask_call("auto", q.float(), SLIDING))
    fused_row = [r for r in table if r[0] == "fused"][0]
    assert chosen == "blocked-torch" and fused_row[1] == "cannot"
    assert any("not built yet (LONGCTX_FUSED=prebuilt" in r for r in fused_row[2])
    assert [r[0] for r in table if r[1] == "runs"] == ["blocked-torch"]


def test_explicit_requests_that_cannot_run_are_one_sentence(monkeypatch):
    _extension(monkeypatch, False)
    q, k, v = _qkv()
    with pytest.raises(LongctxError, match="backend 'sdpa' cannot run this call: runs the full pattern only"):
        attention(q, k, v, SLIDING, backend="sdpa")
    qg = q.detach().requires_grad_()
    with pytest.raises(LongctxError, match="FlexAttention"):
        attention(qg, k, v, SLIDING, backend="flex")
    with pytest.raises(LongctxError, match="attention backend 'nope' is unknown"):
        attention(q, k, v, SLIDING, backend="nope")


def test_explain_logs_each_distinct_call_once(monkeypatch, caplog):
    _extension(monkeypatch, False)
    monkeypatch.setenv("LONGCTX_EXPLAIN_ATTENTION", "1")
    monkeypatch.setattr(dispatch, "_seen", set())
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="longctx.attention.dispatch"):
        for _ in range(2):
            attention(q, k, v, SLIDING)
        attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], SLIDING)  # another length: another shape
    texts = [r.getMessage() for r in caplog.records if r.name == "longctx.attention.dispatch"]
    assert len(texts) == 2, texts
    assert "-> blocked-torch" in texts[0] and "not built yet (LONGCTX_FUSED=prebuilt" in texts[0]
    assert "runs the full pattern only" in texts[0] and "20 tokens" in texts[0] and "10 tokens" in texts[1]


def test_cli_prints_the_choice_and_the_reasons(capsys, monkeypatch):
    _extension(monkeypatch, False)
    rc = main(["attention-backends", "--attention", "sliding", "--window", "256", "--length", "4096", "--dtype", "bf16",
               "--heads", "8", "--head-dim", "64", "--global-tokens", "1", "--causal"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "sliding w=256" in out and "bfloat16" in out and "4096 tokens" in out
    assert "-> blocked-torch" in out
    assert "fused" in out and "not built yet (LONGCTX_FUSED=prebuilt" in out
    assert "runs the full pattern only, not 'sliding'" in out
    rc = main(["attention-backends", "--attention", "sliding", "--dtype", "fp16"])
    out = capsys.readouterr().out
    assert rc == 0 and "dtype float16 (takes float32, bfloat16)" in out


def test_cli_covers_every_mechanism(capsys, monkeypatch):
    _extension(monkeypatch, False)
    from longctx.attention import MECHANISMS
    for name in sorted(MECHANISMS):
        assert main(["attention-backends", "--attention", name, "--length", "256"]) == 0, name
        out = capsys.readouterr().out
        assert "-> " in out, (name, out)
        if MECHANISMS[name].kernel_route == "approx":
            assert "single kernel" in out


@pytest.mark.parametrize("argv, message", [
    (["--length", "abc"], "--length must be an integer >= 1, got 'abc'"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--backend", "fast"], "--backend must be one of"),
    (["--attention", "nope"], "attention type 'nope' is unknown"),
    (["--attention", "full", "--window", "3"], "has no keys ['window']"),
    (["--attention", "linformer", "--global-tokens", "1"], "'linformer' has no global tokens"),
    (["--attention", "sliding", "--backend", "sdpa"], "runs the full pattern only"),
])
def test_cli_bad_values_are_one_line_and_exit_2(argv, message, capsys):
    rc = main(["attention-backends", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err and message in err, err


@pytest.mark.slow  # the config's checks import transformers (seconds)
def test_cli_reads_an_experiment_config(tmp_path, capsys, monkeypatch):
    _extension(monkeypatch, False)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("model:\n  attention: [{type: sliding, window: 8}, {type: blocks, block: 16}]\n"
                   "  num_hidden_layers: 2\ndata:\n  seq_len: 128\n")
    assert main(["attention-backends", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count("attention call:") == 2 and "sliding w=8" in out and "blocks b=16" in out
    assert "128 tokens" in out and "backward" in out


def test_explain_attention_flag_sets_the_environment(monkeypatch, capsys):
    monkeypatch.delenv("LONGCTX_EXPLAIN_ATTENTION", raising=False)
    import os
    assert main(["--explain-attention", "attention-backends", "--attention", "full"]) == 0
    assert os.environ.get("LONGCTX_EXPLAIN_ATTENTION") == "1"
    monkeypatch.delenv("LONGCTX_EXPLAIN_ATTENTION")
