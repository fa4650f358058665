"""The mechanism registry: a mechanism defined here trains through `longctx pretrain`, a staged run saves
the per-layer pattern it trained, configs select mechanisms by one key."""
import json
from dataclasses import dataclass

import pytest
import torch

from longctx.attention import MECHANISMS, Capabilities, Mechanism, SelfAttention, register
from longctx.errors import LongctxError
from longctx.models import LongctxConfig, LongctxForMaskedLM


@pytest.fixture()
def corpus(tmp_path):
    words = "attention window token global local block layer sequence model the of and a to".split()
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(20):
        idx = torch.randint(len(words), (300,), generator=g).tolist()
        (root / f"doc{i:02d}.txt").write_text(" ".join(words[j] for j in idx) + "\n")
    return root


def _pretrain(corpus, out, monkeypatch, tmp_path, *extra):
    from longctx.cli import main
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    return main(["pretrain", "--out", str(out), "--quiet", f"data.corpus={corpus}", "data.tokenizer=bytes",
                 "data.seq_len=32", "model.hidden_size=16", "model.num_attention_heads=2",
                 "model.max_position_embeddings=128", "train.batch_size=1", "train.eval_batches=1",
                 "train.log_every=1", "train.warmup_steps=1", *extra])


# ---- a mechanism written in this file: the README's worked example ---------------------------------
@dataclass(frozen=True)
class DecaySpec:
    tau: float = 4.0  # the distance over which attention decays by e


@register
class Decay(Mechanism):
    """Softmax attention with a learned-free exponential distance penalty -|i - j| / tau."""

    name = "test-decay"
    Spec = DecaySpec
    supports = Capabilities()

    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None):
        return self.reference(q, k, v, key_padding=key_padding)

    def reference(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        n = q.shape[2]
        pos = torch.arange(n, device=q.device)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 - (pos[:, None] - pos[None, :]).abs() / self.spec.tau
        if key_padding is not None:
            s = s.masked_fill(~key_padding[:, None, None, :], float("-inf"))
        return torch.softmax(s, -1) @ v

    def flops(self, n, num_global=0):
        return 4.0 * self.ctx.head_dim * self.ctx.num_heads * n * n

    def describe(self):
        return f"decay tau={self.spec.tau}"


def test_a_mechanism_defined_in_a_test_trains_with_longctx_pretrain(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    rc = _pretrain(corpus, out, monkeypatch, tmp_path, "model.num_hidden_layers=1", "train.steps=3",
                   "model.attention={type: test-decay, tau: 2.0}")
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["attention"] == "decay tau=2.0 (x1)"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3]
    model = LongctxForMaskedLM.from_pretrained(out / "model")
    assert type(model.longctx.layers[0].attention.mechanism) is Decay
    assert model.longctx.layers[0].attention.mechanism.spec.tau == 2.0


def test_unknown_mechanism_and_unknown_key_are_one_sentence():
    with pytest.raises(LongctxError, match="'nope' is unknown"):
        LongctxConfig(attention={"type": "nope"})
    with pytest.raises(LongctxError, match=r"has no keys \['windw'\]"):
        LongctxConfig(attention={"type": "sliding", "windw": 3})
    with pytest.raises(LongctxError, match="needs 2 entries"):
        LongctxConfig(num_hidden_layers=2, attention=[{"type": "full"}])


def test_explicit_per_layer_attention_builds_each_layer_and_round_trips(tmp_path):
    att = [{"type": "sliding", "window": 3, "dilation": [1, 2]}, {"type": "blocks", "block": 5}, "full"]
    cfg = LongctxConfig(vocab_size=32, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        max_position_embeddings=64, attention=att)
    model = LongctxForMaskedLM(cfg)
    kinds = [(lay.attention.pattern.kind, lay.attention.pattern.window, lay.attention.pattern.block,
              lay.attention.pattern.dilation) for lay in model.longctx.layers]
    assert kinds == [("sliding", 3, 0, (1, 2)), ("blocks", 0, 5, 1), ("full", 0, 0, 1)]
    model.save_pretrained(tmp_path / "m")
    again = LongctxForMaskedLM.from_pretrained(tmp_path / "m")
    assert [lay.attention.pattern for lay in again.longctx.layers] == \
        [lay.attention.pattern for lay in model.longctx.layers]
    assert cfg.describe_attention() == "sliding w=3 d=(1, 2) (x1), blocks b=5 (x1), full (x1)"


def test_staged_run_saves_the_per_layer_pattern_it_trained(corpus, tmp_path, monkeypatch):
    """With window_schedule grow, phases set the windows; the saved model must rebuild the windows the
    last phase trained with (before: the schedule was re-applied on reload, a model never trained)."""
    import longctx.train.loop as loop
    trained = []
    real = loop.set_windows

    def spy(model, window):
        real(model, window)
        trained.append([lay.attention.pattern.window for lay in model.longctx.layers])

    monkeypatch.setattr(loop, "set_windows", spy)
    out = tmp_path / "staged"
    rc = _pretrain(corpus, out, monkeypatch, tmp_path, "model.num_hidden_layers=4", "train.steps=4",
                   "model.window=4", "model.window_schedule=grow", "data.seq_len=16",
                   "stages={preset: double, phases: 2, steps: 2}")
    assert rc == 0
    assert trained and trained[-1] == [8, 8, 8, 8]
    model = LongctxForMaskedLM.from_pretrained(out / "model")
    assert [lay.attention.pattern.window for lay in model.longctx.layers] == trained[-1]


def test_layer_takes_a_pattern_a_name_or_a_dict():
    from longctx.attention import AttentionPattern
    a = SelfAttention(16, 2, AttentionPattern("sliding", window=3))
    b = SelfAttention(16, 2, {"type": "sliding", "window": 3})
    assert a.pattern == b.pattern and type(a.mechanism) is MECHANISMS["sliding"]
    assert SelfAttention(16, 2, "full", causal=True).pattern.causal


def test_compare_variants_select_a_mechanism_by_one_key(tmp_path, corpus, monkeypatch):
    import yaml

    from longctx.experiments.compare import attention_flops_per_token, load_comparison
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"name": "c", "base": {
        "data": {"corpus": str(corpus), "tokenizer": "bytes", "seq_len": 64},
        "model": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "window": 4,
                  "max_position_embeddings": 64}}, "variants": [
        {"name": "sliding"}, {"name": "bigbird", "set": {"model.attention": {"type": "bigbird", "block": 8, "random": 1}}},
        {"name": "full", "set": {"model.attention": "full"}}]}))
    comp = load_comparison(tmp_path / "c.yaml", [])
    flops = {v["name"]: attention_flops_per_token(v["config"]) for v in comp["variants"]}
    d, H, n = 8, 2, 64
    assert flops["full"] == 2 * 4 * d * H * n * n / n
    assert flops["sliding"] == 2 * 4 * d * H * sum(n - abs(j) for j in range(-4, 5)) / n
    # bigbird: 8 blocks; rows 0 and 7 global; the rest 3 sliding (2 at the ends), 1 random, 2 global blocks
    cfg = LongctxConfig(**{**comp["variants"][1]["config"]["model"], "vocab_size": 8})
    R = cfg.layer_mechanisms()[0].layout(n)
    assert flops["bigbird"] > flops["sliding"] and flops["bigbird"] < flops["full"]
    assert cfg.describe_attention() == "bigbird b=8 r=1 (x2)" and R.shape == (2, 8, 8)
    out = tmp_path / "bb"
    assert _pretrain(corpus, out, monkeypatch, tmp_path, "model.num_hidden_layers=1", "train.steps=3",
                     "model.attention={type: bigbird, block: 8, random: 1}") == 0
    assert json.loads((out / "results.json").read_text())["attention"] == "bigbird b=8 r=1 (x1)"


def _readme_decay_blocks() -> tuple[str, str]:
    """The README's worked example: the mechanism file and the lines that train with it, as printed."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    mechanism = next(b for b in blocks if 'name = "decay"' in b)
    run = next(b for b in blocks if "import my_decay" in b)
    return mechanism, run


@pytest.mark.slow
def test_the_readmes_decay_example_runs_as_printed(tmp_path):
    """Issue 30: the README's call ended in a literal `...` (a TypeError when copied). Both blocks run as
    printed: the first saved as my_decay.py, the second executed beside it, in a fresh process."""
    import os
    import subprocess
    import sys

    mechanism, run = _readme_decay_blocks()
    assert "..." not in run
    (tmp_path / "my_decay.py").write_text(mechanism)
    (tmp_path / "run.py").write_text(run)
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(
        [str(tmp_path)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    res = subprocess.run([sys.executable, "run.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "decay" / "results.json").read_text())
    assert result["attention"] == "decay tau=2.0 (x2)" and result["steps"] == 3
