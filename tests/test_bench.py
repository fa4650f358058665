"""Smoke runs of `longctx bench attention` and `longctx bench train` at tiny sizes: the JSON schema, every
case really ran (or was skipped and says why), and the reports are written. Not a timed test."""
import json

import pytest

from longctx.cli import main


def _load(out):
    r = json.loads((out / "results.json").read_text())
    assert r["schema"] == 1 and r["machine"]["cores"] >= 1 and r["command"].startswith("longctx bench")
    assert (out / "results.md").read_text().startswith("#")
    return r


def test_bench_attention_smoke(tmp_path):
    out = tmp_path / "att"
    rc = main(["bench", "attention", "--lengths", "128", "256", "--hidden", "32", "--heads", "2", "--attention-window", "64",
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
    assert {t["target"] for t in r["targets"]}


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


def test_bench_bad_input_is_one_clear_error(tmp_path, capsys):
    assert main(["bench", "attention", "--impl", "no-such-kernel", "--out", str(tmp_path)]) == 2
    assert "unknown" in capsys.readouterr().err
    assert main(["bench", "train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
