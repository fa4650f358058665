"""Smoke runs of `longctx bench attention` and `longctx bench train` at tiny sizes: the JSON schema, every
case really ran (or was skipped and says why), and the reports are written. Not a timed test. Targets
come from the config's YAML and are checked against the cases' own numbers; FLOPs against dense masks."""
import json

import pytest
import torch

from longctx.cli import main

ATTENTION_TARGETS = """
name: tiny
targets:
  - {target: "HF over sliding", field: train_s, of: hf-longformer, over: longctx-sliding, n: 128, goal: ">= 1/2"}
  - {target: "core peak", field: train_peak_bytes, of: core-sliding, n: 128, unit: MiB, goal: "< 1e9"}
  - {target: "a skipped case", field: train_s, of: {impl: longctx-sliding, n: 256}, over: longctx-sliding, n: 128,
     goal: "<= 9"}
"""


def _load(out):
    r = json.loads((out / "results.json").read_text())
    assert r["schema"] == 1 and r["machine"]["cores"] >= 1 and r["command"].startswith("longctx bench")
    assert (out / "results.md").read_text().startswith("#")
    return r


@pytest.mark.slow
def test_bench_attention_smoke(tmp_path, capsys):
    out = tmp_path / "att"
    (tmp_path / "tiny.yaml").write_text(ATTENTION_TARGETS)
    rc = main(["bench", "attention", "--config", str(tmp_path / "tiny.yaml"), "--lengths", "128", "256",
               "--hidden", "32", "--heads", "2", "--attention-window", "64",
               "--impl", "longctx-sliding", "core-sliding", "hf-longformer", "--repeats", "2", "--warmup", "1",
               "--time-cap", "1e-9", "--out", str(out)])
    assert rc == 0
    r = _load(out)
    assert r["benchmark"] == "attention" and r["matmul_gflops"]["float32"] > 0
    assert (out / "time.png").stat().st_size > 0 and (out / "memory.png").stat().st_size > 0
    cases = {(c["impl"], c["n"]): c for c in r["cases"]}
    assert len(cases) == 6
    for impl in ("longctx-sliding", "core-sliding", "hf-longformer"):
        c = cases[(impl, 128)]
        assert c["status"] == "ok", c
        assert len(c["fwd_times"]) == 2 and len(c["train_times"]) == 2
        assert 0 < c["fwd_s"] and 0 < c["train_s"]
        assert c["train_peak_bytes"] > 0 and c["useful_flops_train"] == 3 * c["useful_flops_fwd"] > 0
        assert 0 < c["train_fraction_of_matmul"] == pytest.approx(c["train_gflops"] / r["matmul_gflops"]["float32"])
        # the cap is tiny, so the next length is predicted to exceed it: skipped, and marked so
        s = cases[(impl, 256)]
        assert s["status"] == "skipped" and "time cap" in s["reason"]
    # the targets are the YAML's, computed from the cases' own numbers; a case not run gives n/a
    hf_over, peak, skipped = r["targets"]
    want = cases[("hf-longformer", 128)]["train_s"] / cases[("longctx-sliding", 128)]["train_s"]
    assert hf_over["target"] == "HF over sliding" and hf_over["value"] == pytest.approx(want)
    assert hf_over["goal"] == ">= 1/2" and hf_over["met"] == (want >= 0.5)
    assert peak["value"] == pytest.approx(cases[("core-sliding", 128)]["train_peak_bytes"] / 2**20) and peak["met"]
    assert skipped["value"] is None and skipped["met"] is None
    assert "| a skipped case | - | <= 9 | n/a |" in (out / "results.md").read_text()
    # progress: one line per case and the shared helper's rate/ETA line (not a terminal here)
    err = capsys.readouterr().err
    assert "[6/6] hf-longformer n=256 float32: skipped" in err and "bench attention: 6/6 cases" in err and "ETA" in err


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    out = tmp_path / "train"
    rc = main(["bench", "train", "--lengths", "128", "--layers", "1", "--hidden", "32", "--heads", "2",
               "--attention-window", "64", "--models", "longctx", "hf-longformer", "--repeats", "1", "--warmup", "1",
               "--out", str(out)])
    assert rc == 0
    r = _load(out)
    assert [c["model"] for c in r["cases"]] == ["longctx", "hf-longformer"]
    for c in r["cases"]:
        assert c["status"] == "ok", c
        assert c["finite"] and c["tokens_per_s"] > 0 and c["peak_bytes"] > 0 and c["parameters"] > 0
        assert c["tokens_per_s"] == pytest.approx(128 / c["step_s"])
    assert (out / "tokens_per_s.png").stat().st_size > 0
    # no config, no targets: none reported, no targets table
    assert r["targets"] == [] and "| target |" not in (out / "results.md").read_text()


def test_bench_bad_input_is_one_clear_error(tmp_path, capsys):
    assert main(["bench", "attention", "--impl", "no-such-kernel", "--out", str(tmp_path)]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["bench", "train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bench_targets_from_yaml():
    """Every shipped benchmark config's targets are well formed; the evaluator's ratios, relative
    differences, units and matmul-relative goals on a hand-made result."""
    from pathlib import Path

    from longctx.bench import attention, common, hf, train
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    for f in sorted(root.glob("*.yaml")):
        mod, key, names = {"train": (train, "model", train.MODELS), "hf": (hf, "impl", hf.IMPLEMENTATIONS),
                             "hf-train": (hf, "impl", hf.IMPLEMENTATIONS)}.get(
            f.stem, (attention, "impl", attention.IMPLS))
        cfg = common.load_config(str(f), mod.DEFAULTS, f.stem)
        assert cfg["targets"], f
        common.check_targets(cfg["targets"], key, names)
    ok = lambda **c: {"status": "ok", **c}  # noqa: E731
    result = {"matmul_gflops": {"float32": 100.0, "bfloat16": 300.0}, "cases": [
        ok(model="a", n=8, tps=30.0, loss=2.0, peak=3 * 2**30), ok(model="b", n=8, tps=10.0, loss=2.1),
        {"status": "failed", "model": "c", "n": 8}]}
    t = lambda **kw: common.evaluate_target(result, {"target": "t", **kw}, "model")[0]  # noqa: E731
    r = t(field="tps", of="a", over="b", n=8, goal=">= 1/2", goal_times_matmul=["bfloat16", "float32"])
    assert r["value"] == 3.0 and r["met"] is True and r["goal"].startswith(">= 1.50")
    r = t(field="tps", of="b", over="a", n=8, goal=">= 1/2", goal_times_matmul=["bfloat16", "float32"])
    assert r["value"] == pytest.approx(1 / 3) and r["met"] is False
    r = t(field="loss", of="b", over="a", compare="relative_difference", goal="<= 0.02")
    assert r["value"] == pytest.approx(0.05) and r["met"] is False
    assert t(field="peak", of={"model": "a", "n": 8}, unit="GiB", goal="< 3")["value"] == 3.0
    assert t(field="peak", of="a", unit="GiB", goal="< 3")["met"] is False
    assert t(field="tps", of="c", over="a", goal="> 0")["met"] is None  # a failed case: not measured


@pytest.mark.parametrize("bad, words", [
    ([{"target": "x", "field": "train_s", "of": "no-such-impl", "goal": ">= 1"}], "unknown"),
    ([{"target": "x", "field": "train_s", "of": "sdpa-dense", "goal": "at least 3"}], "goal"),
    ([{"target": "x", "field": "train_s", "of": "sdpa-dense", "goal": ">= 1", "speed": 3}], "unknown keys"),
    ([{"target": "x", "of": "sdpa-dense", "goal": ">= 1"}], "needs the keys"),
])
def test_bench_bad_target_is_one_sentence(tmp_path, capsys, bad, words):
    import yaml
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"targets": bad}))
    assert main(["bench", "attention", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err
    assert not (tmp_path / "out").exists()


def test_bench_flops_count_the_pairs_each_case_computes():
    """Useful FLOPs, asked of the registry mechanism, equal 4 d H x the pairs of the dense mask each case
    computes; local-attention's buckets (own bucket causally, whole previous bucket) counted by brute
    force from its own rule."""
    from longctx.attention.patterns import AttentionPattern, full_mask
    from longctx.bench.attention import DEFAULTS, useful_flops
    H, D, w, n = 4, 32, 16, 70
    pairs = lambda pattern: full_mask(pattern, n, H).expand(1, H, n, n).sum().item()  # noqa: E731  all heads
    cfg = dict(DEFAULTS, hidden=D, heads=H, attention_window=w, batch=1)
    d = D // H
    patterns = {"core-sliding": AttentionPattern("sliding", window=w // 2),
                "core-sliding-half-torch": AttentionPattern("sliding", window=w // 4)}
    for impl, pattern in patterns.items():
        assert useful_flops(impl, n, cfg)[0] == 4 * d * pairs(pattern)
    proj = 2.0 * n * D * D * 4
    masks = {"sdpa-dense": AttentionPattern("full"), "sdpa-masked": AttentionPattern("sliding", window=w // 2),
             "longctx-dilated": AttentionPattern("sliding", window=w // 2, dilation=(1, 1, 2, 2)),
             "longctx-blocks": AttentionPattern("blocks", block=w),
             "longctx-blockwise-causal": AttentionPattern("blockwise_causal", block=w),
             "longctx-causal": AttentionPattern("sliding", window=w // 2, causal=True)}
    for impl, pattern in masks.items():
        assert useful_flops(impl, n, cfg)[0] == 4 * d * pairs(pattern) + proj, impl
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    W = w // 2
    buckets = (j <= i) & ((j // W == i // W) | (j // W == i // W - 1))
    assert useful_flops("local-attention", n, cfg)[0] == 4 * d * H * buckets.sum().item() + proj


@pytest.mark.parametrize("impl, mechanism", [("longctx-linformer", "linformer"), ("longctx-lsh", "lsh"),
                                             ("longctx-sliding", None)])
def test_bench_family_case_runs_its_mechanism(impl, mechanism):
    """A family case times the family's mechanism, not the mask layer its "longctx-" name also matches."""
    from longctx.attention import SelfAttention
    from longctx.bench.attention import DEFAULTS, build
    module, inputs, fn = build(impl, 64, dict(DEFAULTS, hidden=16, heads=2), torch.float32)
    if mechanism is None:
        assert isinstance(module, SelfAttention)
    else:
        assert not isinstance(module, SelfAttention) and module.core.name == mechanism
    assert fn(*inputs).shape == (1, 64, 16)
