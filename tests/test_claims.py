"""The papers' claims table (longctx.experiments.claims): each recipe's verdict logic on synthetic results
whose answer is known (a clear effect holds, a null effect is not reproduced, an effect in the right
direction inside the noise holds in direction only), the table from a runs folder, and the conversion
recipe's extension against the short model it starts from."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from longctx import stats
from longctx.experiments import claims
from longctx.experiments.claims import DIRECTION, HOLDS, NOT_REPRODUCED

RNG = np.random.default_rng(0)
ROOT = Path(__file__).parents[1]


def test_the_rules():
    assert claims.greater(0.5, [0.1, 0.9], 0.0) == HOLDS
    assert claims.greater(0.5, [-0.1, 0.9], 0.0) == DIRECTION
    assert claims.greater(-0.1, [-0.3, 0.1], 0.0) == NOT_REPRODUCED
    assert claims.greater(0.0, [0.0, 0.0], 0.0) == NOT_REPRODUCED  # no effect is not an effect
    assert claims.greater(9.0, None, 0.0) == DIRECTION  # one number without an interval never "holds"
    assert claims.less(-0.5, [-0.9, -0.1], 0.0) == HOLDS and claims.less(-0.5, [-0.9, 0.1], 0.0) == DIRECTION
    assert claims.less(0.2, [0.1, 0.3], 0.0) == NOT_REPRODUCED
    # a claimed size (1) apart from no effect (0): the right direction, clearly, but smaller than claimed
    assert claims.greater(0.45, [0.38, 0.51], 1.0, none=0.0) == DIRECTION
    assert claims.greater(1.5, [1.2, 1.8], 1.0, none=0.0) == HOLDS
    assert claims.greater(-0.1, [-0.2, 0.0], 1.0, none=0.0) == NOT_REPRODUCED
    assert claims.less(1.02, [0.99, 1.05], 0.5, none=1.0) == NOT_REPRODUCED
    assert claims.within(0.01, [-0.02, 0.04], -0.05, 0.05) == HOLDS
    assert claims.within(0.01, [-0.2, 0.2], -0.05, 0.05) == DIRECTION
    assert claims.within(0.1, [0.08, 0.12], -0.05, 0.05) == NOT_REPRODUCED
    # an estimate outside its own (percentile) interval, on the wrong side: never "holds"
    assert claims.less(0.6, [-0.2, 0.45], 0.5) == NOT_REPRODUCED
    with pytest.raises(ValueError, match="no-effect line"):
        claims.greater(-0.1, [0.1, 0.2], 0.0, none=0.5)
    # "the same or better" (lower is better) within a tolerance: the interval's upper end at most the tolerance
    assert claims.not_worse(-0.01, [-0.03, 0.01], 0.02) == HOLDS
    assert claims.not_worse(0.0, [-0.02, 0.02], 0.02) == HOLDS  # at most: the tolerance itself is inside
    assert claims.not_worse(0.01, [-0.01, 0.03], 0.02) == DIRECTION  # not worse by the estimate, noisy
    assert claims.not_worse(0.02, [0.01, 0.03], 0.02) == DIRECTION
    assert claims.not_worse(0.03, [0.01, 0.05], 0.02) == NOT_REPRODUCED  # worse by more than the tolerance
    assert claims.not_worse(-0.5, None, 0.02) == DIRECTION  # one number without an interval never "holds"
    assert claims.not_worse(float("nan"), [0.0, 0.0], 0.02) == NOT_REPRODUCED
    assert claims.weakest([HOLDS, DIRECTION, HOLDS]) == DIRECTION
    assert claims.weakest([HOLDS, NOT_REPRODUCED, DIRECTION]) == NOT_REPRODUCED


def _losses(effect: float, noise: float, seeds: int = 2, n: int = 200) -> dict:
    """Per-sequence held-out losses of two variants on the same sequences: 'increasing' = 'decreasing' +
    effect + zero-mean noise (so the paired mean difference is exactly ``effect``)."""
    base = 1.0 + RNG.random((seeds, n))
    e = RNG.normal(0, noise, (seeds, n)) if noise else np.zeros((seeds, n))
    e -= e.mean()
    return {"increasing": base + effect + e, "decreasing": base}


@pytest.mark.parametrize("effect, noise, verdict", [
    (-0.05 * math.log(2), 0.01, HOLDS),          # 0.05 BPC better, tight
    (0.0, 0.0, NOT_REPRODUCED),                  # no difference at all
    (0.02 * math.log(2), 0.01, NOT_REPRODUCED),  # the other way
    (-0.002, 0.5, DIRECTION),                    # the right way, inside the noise
])
def test_char_lm_windows_verdict(effect, noise, verdict):
    scores = _losses(effect, noise)
    results = {"study": {"columns": {"pretraining loss": {"pairwise": stats.pairwise(scores, higher_is_better=False)}}}}
    (part,) = claims.measure_windows(results)
    assert part.verdict == verdict, part
    assert part.ours.startswith(f"{effect / math.log(2):+.4f}")  # reported in bits per character


def _staged_results(effect_bpc: float, noise: float, order=("one-phase", "staged"), flops=(8.6728e12, 8.6736e12)):
    """A charlm-staged-vs-one comparison's results.json: staged's per-sequence held-out loss (nats per byte) is
    one-phase's + effect_bpc x ln 2 + zero-mean noise, on the same sequences, 2 seeds."""
    base = 1.0 + RNG.random((2, 200))
    e = RNG.normal(0, noise, base.shape) if noise else np.zeros(base.shape)
    e -= e.mean()
    loss = {"one-phase": base, "staged": base + effect_bpc * math.log(2) + e}
    scores = {k: loss[k] for k in order}  # the study keeps pairs in variant order
    variants = [{"variant": k, "seq_len": 512, "train_flops": f,
                 "eval": {"loss": float(loss[k].mean()), "loss_ci": [float(loss[k].mean()) - 0.01, float(loss[k].mean()) + 0.01]}}
                for k, f in zip(("one-phase", "staged"), flops)]
    return {"study": {"columns": {"pretraining loss": {"pairwise": stats.pairwise(scores, higher_is_better=False)}}},
            "variants": variants}


@pytest.mark.parametrize("order", [("one-phase", "staged"), ("staged", "one-phase")])
@pytest.mark.parametrize("effect, noise, verdict", [
    (-0.05, 0.01, HOLDS),            # staged 0.05 BPC better, tight
    (0.0, 0.0, HOLDS),               # the same
    (0.01, 0.005, HOLDS),            # 0.01 BPC worse, inside the 0.02 tolerance, interval and all
    (0.01, 0.5, DIRECTION),          # 0.01 BPC worse by the estimate, the interval past the tolerance
    (0.05, 0.01, NOT_REPRODUCED),    # worse by more than the tolerance
])
def test_char_lm_staged_verdict(tmp_path, effect, noise, verdict, order):
    results = _staged_results(effect, noise, order)
    parts = claims.measure_staged(results)
    assert parts[0].verdict == verdict and parts[0].in_verdict, parts[0]
    assert float(parts[0].ours.split()[0]) == pytest.approx(effect, abs=1e-4)  # staged minus one-phase, in BPC
    assert "at most +0.02 BPC" in parts[0].what and "at 512 characters" in parts[0].what
    lo, hi = (float(x) for x in parts[0].ours.split("[")[1].rstrip("]").split(", "))
    assert lo <= effect <= hi
    # beside the verdict: each arm's BPC (loss / ln 2) and the FLOPs each spent
    assert [p.in_verdict for p in parts[1:]] == [False, False]
    bpc = {v["variant"]: v["eval"]["loss"] / math.log(2) for v in results["variants"]}
    assert f"staged {bpc['staged']:.4f}" in parts[1].ours and f"one-phase {bpc['one-phase']:.4f}" in parts[1].ours
    assert "staged 8.674e+12; one-phase 8.673e+12 (staged / one-phase = 1.0001)" == parts[2].ours
    # the claim's verdict is its rule's, through the runs folder
    (tmp_path / "charlm-staged-vs-one").mkdir()
    (tmp_path / "charlm-staged-vs-one" / "results.json").write_text(json.dumps(results))
    (row,) = [r for r in claims.evaluate_all(tmp_path) if r["key"] == "charlm-staged"]
    assert row["verdict"] == verdict


def test_char_lm_staged_reports_flops_not_counted():
    results = _staged_results(0.0, 0.01, flops=(8.6728e12, None))
    assert claims.measure_staged(results)[2].ours == "staged not counted; one-phase 8.673e+12"


def _lex_results(rope_growth: float, xpos_growth: float, noise: float = 0.02, docs: int = 16) -> dict:
    L = 128
    base = 3.0 + RNG.random(docs)

    def rows(growth_per_doubling):
        out = []
        for m in (1, 2, 4, 8):
            e = RNG.normal(0, noise, docs) if m > 1 else np.zeros(docs)
            e -= e.mean()  # the mean growth is exactly as asked
            per = base + growth_per_doubling * math.log2(m) + e
            out.append({"length": m * L, "loss": float(per.mean()), "perplexity": math.exp(per.mean()),
                        "per_example": per.tolist(), "attention_resolution": 0.5})
        return out

    xb = rows(xpos_growth)
    xb[1]["attention_resolution"] = 0.9  # at 2L, where the paper measures it
    variant = lambda name, runs: {"name": name, "extrapolation": {"training_length": L, "runs": runs}}  # noqa: E731
    return {"variants": [variant("rope", {"plain": {"rows": rows(rope_growth)}}),
                         variant("xpos", {"plain": {"rows": rows(0.5)}, "blockwise": {"rows": xb}})]}


def test_lex_verdicts():
    # RoPE's perplexity x e^2 = 7.4 at 4L, xPos + blockwise flat: both hold; resolution has no interval
    parts = claims.measure_lex(_lex_results(rope_growth=1.0, xpos_growth=0.0))
    assert [p.verdict for p in parts] == [HOLDS, HOLDS, DIRECTION]
    assert parts[0].ours.startswith(f"{math.exp(2.0):.2f}x") and "at 8L" in parts[0].ours
    # RoPE grows 1.1x (the direction, not the size 2x); xPos grows 10% per doubling: not within 5%
    parts = claims.measure_lex(_lex_results(rope_growth=0.05, xpos_growth=0.05))
    assert [p.verdict for p in parts[:2]] == [DIRECTION, NOT_REPRODUCED]
    # RoPE better at 4L than at L: not reproduced
    assert claims.measure_lex(_lex_results(rope_growth=-0.05, xpos_growth=0.0))[0].verdict == NOT_REPRODUCED


def test_conversion_and_compute_verdicts():
    copy_ = 2.0 + RNG.random(64)
    ev = lambda per: {"per_example": list(per), "loss": float(np.mean(per))}  # noqa: E731
    res = {"long_length": 512, "short_length": 128,
           "evaluations": {"short": ev(copy_ - 0.1), "copy": ev(copy_), "random": ev(copy_ + 4 + RNG.normal(0, .1, 64))}}
    assert claims.measure_conversion(res)[0].verdict == HOLDS
    res["evaluations"]["random"] = ev(copy_ + 0.3 + RNG.normal(0, .1, 64))  # worse, by less than 1 bit
    assert claims.measure_conversion(res)[0].verdict == DIRECTION
    res["evaluations"]["random"] = ev(copy_ - 0.01)  # random new rows cost nothing: the claim fails
    assert claims.measure_conversion(res)[0].verdict == NOT_REPRODUCED

    # units: 0.8 nats is 1.15 bits, above the claimed 1 bit (undivided by ln 2 it would read "direction only")
    res["evaluations"]["random"] = ev(copy_ + 0.8 + RNG.normal(0, .01, 64))
    (part,) = claims.measure_conversion(res)
    assert part.verdict == HOLDS and part.ours.startswith(f"{0.8 / math.log(2):+.3f}"[:5])

    f1 = RNG.random((3, 300))

    def compute(shift, noise):
        """The study's pairs of a compute run: blocks at 5e11 = sliding-global at 1e12 + shift (+ noise);
        the sliding-global name sorts first, so the study holds the pair as 'sliding-global-1e12 vs
        blocks-5e11' and the claim must turn it round."""
        e = RNG.normal(0, noise, f1.shape)
        tables = {"sliding-global-1e12": f1, "blocks-5e11": f1 + shift + (e - e.mean()),
                  "sliding-global-5e11": f1 - 0.2, "blocks-1e12": f1}
        v = lambda name, budget: {"variant": f"{name}-{budget:.0e}".replace("+", ""),  # noqa: E731
                                  "compute": {"variant": name, "budget": budget}}
        return {"variants": [v("sliding-global", 1e12), v("blocks", 5e11), v("sliding-global", 5e11), v("blocks", 1e12)],
                "study": {"columns": {"qa": {"pairwise": stats.pairwise(tables, higher_is_better=True)}}}}
    (part,) = claims.measure_compute(compute(0.0, 0.01))
    assert part.verdict == HOLDS                                                        # the same F1
    (part,) = claims.measure_compute(compute(-0.2, 0.01))
    assert part.verdict == NOT_REPRODUCED and part.ours.startswith("-0.200")            # 0.2 F1 worse, signed
    assert claims.measure_compute(compute(0.02, 1.0))[0].verdict == DIRECTION           # close, but noisy


def test_study_and_structformer_verdicts_read_the_studys_pairs():
    base = RNG.random((2, 100))  # the study keeps pairs in variant order: blocks and linformer before the reference
    qa = {"blocks": base - 0.2, "linformer": base + 0.2, "sliding-global": base}  # local better / worse
    study = {"reference": "sliding-global", "kendall_tau": {"qa vs listops (LRA, from scratch)": {"tau": 0.1, "ci": [-0.1, 0.3]}},
             "columns": {"qa": {"pairwise": stats.pairwise(qa, higher_is_better=True)}}}
    parts = claims.measure_study({"study": study, "variants": [{"variant": v} for v in ["full", *qa]]})
    assert [(p.what.split(" minus ")[1].split(" ")[0], p.verdict) for p in parts[:2]] == [
        ("blocks", HOLDS), ("linformer", NOT_REPRODUCED)]
    assert parts[2].verdict == HOLDS  # tau below 0.5, interval and all

    sh = {"text-only": RNG.random((1, 200))}
    sh["text-only+ft-headings"] = sh["text-only"] + 0.3
    sh["headings-global+ft-text"] = sh["text-only"] + 0.1
    sh["headings-global"] = sh["text-only+ft-headings"]  # pretraining adds nothing once headings are reachable
    res = {"study": {"columns": {"section_heading": {"pairwise": stats.pairwise(sh, higher_is_better=True)}}},
           "variants": [{"variant": v} for v in sh]}
    parts = claims.measure_structformer(res)
    assert [p.verdict for p in parts] == [NOT_REPRODUCED, HOLDS, "(reported)"]
    assert not parts[2].in_verdict


def test_the_table_from_a_runs_folder(tmp_path):
    from longctx.cli import main

    (tmp_path / "charlm-windows").mkdir()
    scores = _losses(-0.05, 0.01)
    (tmp_path / "charlm-windows" / "results.json").write_text(json.dumps({
        "date": "2026-12-07", "machine": {"cpu": "Test CPU", "cpus": 2},
        "study": {"columns": {"pretraining loss": {"pairwise": stats.pairwise(scores, higher_is_better=False)}}}}))
    rows = {r["key"]: r for r in claims.evaluate_all(tmp_path)}
    assert rows["charlm-windows"]["verdict"] == HOLDS
    assert all(r["verdict"] == "not run" for k, r in rows.items() if k != "charlm-windows")
    assert main(["claims", "table", "--out", str(tmp_path), "--write", str(tmp_path / "claims.md")]) == 0
    md = (tmp_path / "claims.md").read_text()
    assert "| holds | 2026-12-07, Test CPU (2 CPUs) |" in md
    assert "`longctx compare --config configs/lex-extrapolation.yaml` | | | | not run |" in md
    assert main(["claims", "table", "--out", str(tmp_path), "train.steps=3"]) == 2  # overrides: conversion only


def test_extension_keeps_the_short_model_on_its_own_positions():
    """The copied table repeats the learned rows; the random one keeps the first L rows and draws the rest.
    On an input of L tokens both give the short model's logits (the extension changes nothing it had)."""
    from longctx.experiments.conversion import extended
    from longctx.models import LongctxConfig, LongctxForMaskedLM

    torch.manual_seed(0)
    short = LongctxForMaskedLM(LongctxConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             attention="sliding", window=4, position="learned",
                                             max_position_embeddings=16)).eval()
    ids = torch.randint(5, 50, (2, 16))
    table = next(v for k, v in short.state_dict().items() if k.endswith("position_embeddings.weight"))
    for how in ("copy", "random"):
        long = extended(short, 64, how)
        new = next(v for k, v in long.state_dict().items() if k.endswith("position_embeddings.weight"))
        assert new.shape[0] == 64 and torch.equal(new[:16], table)
        if how == "copy":
            assert torch.equal(new[16:32], table) and torch.equal(new[48:], table)
        else:
            assert not torch.equal(new[16:32], table)
        with torch.no_grad():
            assert torch.allclose(long(input_ids=ids).logits, short(input_ids=ids).logits, atol=1e-6)


@pytest.mark.slow
def test_conversion_recipe_runs_and_writes_what_the_claim_reads(tmp_path):
    from longctx.cli import main

    assert main(["claims", "conversion", "--out", str(tmp_path), "--quiet", "train.steps=3", "train.save_every=0",
                 "model.hidden_size=16", "model.num_hidden_layers=1", "model.num_attention_heads=2"]) == 0
    res = json.loads((tmp_path / "conversion" / "results.json").read_text())
    assert res["long_length"] == 4 * res["short_length"] == 512
    ev = res["evaluations"]
    assert len(ev["copy"]["per_example"]) == len(ev["random"]["per_example"]) == 64
    (row,) = [r for r in claims.evaluate_all(tmp_path) if r["key"] == "conversion"]
    bits = (np.mean(ev['random']['per_example']) - np.mean(ev['copy']['per_example'])) / math.log(2)
    assert row["verdict"] in (HOLDS, DIRECTION, NOT_REPRODUCED) and row["parts"][0]["ours"].startswith(f"{bits:+.3f}")


def test_every_claims_recipe_loads_and_a_finetune_section_that_cannot_chunk_is_refused_before_pretraining(tmp_path):
    """The recipes' configs pass every check that can be made before an hour of pretraining (the compute
    recipe's QA once had chunks that could not advance: found only after pretraining)."""
    import yaml

    from longctx.errors import LongctxError
    from longctx.experiments.compare import load_comparison

    for c in claims.CLAIMS:
        if c.command.startswith("longctx compare"):
            argv = c.command.split()
            load_comparison(str(ROOT / argv[argv.index("--config") + 1]) if "--config" in argv else None, [])
    bad = yaml.safe_load((ROOT / "configs/compute-blocks-vs-longformer.yaml").read_text())
    bad["finetune"]["qa"]["task"] = {"context_chars": 500}  # doc_stride 128 beside 64 question tokens in 128
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(LongctxError, match="finetune.qa: data.seq_len=128 leaves 61 context tokens"):
        load_comparison(str(tmp_path / "bad.yaml"), [])
    # a variant's finetuning setting of the wrong type: refused at load, naming the variant and the task
    sf = yaml.safe_load((ROOT / "configs/structformer.yaml").read_text())
    sf["variants"][1]["set"]["task.heading_global"] = 3
    (tmp_path / "sf.yaml").write_text(yaml.safe_dump(sf))
    with pytest.raises(LongctxError, match=r"variant 'text-only\+ft-headings', finetune.section_heading: .*expects str or bool"):
        load_comparison(str(tmp_path / "sf.yaml"), [])


def test_a_run_made_with_other_settings_than_the_recipe_is_said_not_crashed(tmp_path, capsys):
    """`longctx compare --config configs/lex-extrapolation.yaml extrapolation.multiples=[1,2]` has no 4L row."""
    from longctx.cli import main

    (tmp_path / "lex").mkdir()
    rows = [{"length": n, "perplexity": 3.0, "per_example": [1.0, 1.1]} for n in (128, 256)]
    ext = {"training_length": 128, "runs": {"plain": {"rows": rows}, "blockwise": {"rows": rows}}}
    (tmp_path / "lex" / "results.json").write_text(json.dumps({
        "variants": [{"name": p, "extrapolation": ext} for p in ("rope", "xpos")]}))
    row = next(r for r in claims.evaluate_all(tmp_path) if r["key"] == "lex")
    assert row["verdict"] == "not run as the recipe" and "no 512" in row["parts"][0]["ours"]
    assert main(["claims", "table", "--out", str(tmp_path)]) == 0
    assert "not run as the recipe" in capsys.readouterr().out
