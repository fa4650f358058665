"""Compute budgets: the FLOPs of a training step (a hand count, and torch's own FlopCounterMode on the real
forward + backward), budgets turned into steps, a budgeted run equal to the same steps given directly and
resumed exactly after SIGKILL, a comparison under a FLOPs budget with its compute section, and the
misuse errors (one sentence each)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from longctx.errors import LongctxError
from longctx.models import LongctxConfig, LongctxForMaskedLM, LongctxForQuestionAnswering
from longctx.train.budget import matmul_weights, step_flops, steps_for

B, N, V, HID, LAYERS, HEADS, W = 2, 48, 50, 32, 2, 2, 4
D = HID // HEADS


def _model(cls=LongctxForMaskedLM, **kw):
    torch.manual_seed(0)
    fields = dict(vocab_size=V, hidden_size=HID, num_hidden_layers=LAYERS, num_attention_heads=HEADS, window=W,
                  max_position_embeddings=64, sep_token_id=3, global_projections=True)
    return cls(LongctxConfig(**{**fields, **kw}))


def _mlm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, V, (B, N), generator=g)
    labels = torch.full((B, N), -100)
    labels[:, ::3] = ids[:, ::3]  # 16 predicted positions per sequence
    return {"input_ids": ids, "labels": labels}


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    # torch's own count of a fused backward: the recomputed Q K^T, dV, dP, dQ and dK (five products)
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch's flop counter has formulas for the CUDA fused attention kernels but not for the CPU one
CPU_FLASH = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


def _flop_counter(model, batch) -> int:
    with FlopCounterMode(display=False, custom_mapping=CPU_FLASH) as fc:
        model(**batch).loss.backward()
    return fc.get_total_flops()


def test_step_flops_is_the_hand_count():
    """6 x weights x positions (encoder: every position; MLM head: the 16 x 2 masked ones) + 3 x 4 d per
    attended pair per head, per layer, per sequence; global projections only with global tokens."""
    m = _model(attention="sliding")
    per_layer = 4 * HID * HID + 2 * HID * 4 * HID         # q, k, v, out; the feed-forward (4 x hidden)
    head = HID * HID + HID * V                             # LM head: dense, decoder (tied, still a product)
    assert matmul_weights(m) == {"body": LAYERS * per_layer, "global": LAYERS * 3 * HID * HID, "head": head}
    pairs = N * (2 * W + 1) - W * (W + 1)                  # a one-sided window of 4 over 48 tokens: 412
    core = 4 * D * HEADS * pairs * LAYERS                  # forward, one sequence
    want = 6 * (LAYERS * per_layer * B * N + head * B * 16) + 3 * core * B
    assert step_flops(m, _mlm_batch()) == want
    # one global token per sequence: the global projections run on every position; pairs +2n-1 per head
    batch = dict(_mlm_batch(), global_attention_mask=torch.zeros(B, N, dtype=torch.bool))
    batch["global_attention_mask"][:, 0] = True
    extra = 6 * LAYERS * 3 * HID * HID * B * N + 3 * 4 * D * HEADS * (2 * N - 1) * LAYERS * B
    assert step_flops(m, batch) == want + extra


def test_step_flops_agree_with_torch_flop_counter():
    """torch.utils.flop_counter counts the matrix products the real forward + backward runs. With full
    attention on the dense reference it computes exactly the useful work: equal to the count. With a
    sliding window on the dense reference it computes all n^2 pairs: the difference is exactly 3 x 4 d
    per masked-out pair per head, layer and sequence. Linformer's attention over its k projected keys runs
    on PyTorch's fused kernel, whose backward recomputes Q K^T: exactly 2 n k d per head, layer and
    sequence over the useful count."""
    batch = _mlm_batch()
    full = _model(attention="full", attention_backend="dense")
    assert _flop_counter(full, batch) == step_flops(full, batch)
    sliding = _model(attention="sliding", attention_backend="dense")
    masked_out = N * N - (N * (2 * W + 1) - W * (W + 1))
    assert _flop_counter(sliding, batch) - step_flops(sliding, batch) == 3 * 4 * D * HEADS * masked_out * LAYERS * B
    lin = _model(attention={"type": "linformer", "k": 16})
    assert _flop_counter(lin, batch) - step_flops(lin, batch) == 2 * N * 16 * D * HEADS * LAYERS * B
    # QA: the head on every position; the question (before the separator at 5) global. The dense kernel
    # computes global rows for all n queries and then keeps 5: more than the useful work, never less.
    qa = _model(LongctxForQuestionAnswering, attention="full", attention_backend="dense")
    ids = batch["input_ids"].clone()
    ids[:, 5] = 3
    qb = {"input_ids": ids, "start_positions": torch.tensor([7, 9]), "end_positions": torch.tensor([8, 9])}
    counted, ours = _flop_counter(qa, qb), step_flops(qa, qb)
    no_global = step_flops(qa, dict(qb, global_attention_mask=torch.zeros(B, N, dtype=torch.bool)))
    assert no_global < ours <= counted


def test_budget_to_steps():
    per = {"flops_per_step": 3.0e9, "tokens_per_step": 512.0, "seconds_per_step": 0.25}
    assert steps_for({"flops": 3.0e10}, per) == 10          # exactly ten steps, not nine by rounding
    assert steps_for({"flops": 3.29e10}, per) == 10
    assert steps_for({"tokens": 5120}, per) == 10
    assert steps_for({"seconds": 2.6}, per) == 10
    with pytest.raises(LongctxError, match="less than one training step") as e:
        steps_for({"flops": 1e9}, per)
    assert len(str(e.value).splitlines()) == 1
    for flops in (float("inf"), 1e300, 3.0e9 * 1e9 * 1.01):
        with pytest.raises(LongctxError, match="buys more than 1,000,000,000 training steps") as e:
            steps_for({"flops": flops}, per)
        assert len(str(e.value).splitlines()) == 1
    assert steps_for({"flops": 3.0e9 * 1e9}, per) == 10**9


@pytest.mark.slow
def test_an_infinite_budget_is_one_sentence(corpus, tmp_path):
    r = _cli(_tiny(corpus, tmp_path / "r", "train.budget.flops=.inf"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "train.budget.flops=inf buys more than" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    words = "attention window token global local block layer sequence model document the of and a".split()
    for i in range(6):
        (root / f"d{i}.txt").write_text(f"document {i} " + " ".join(words[(i * 7 + j) % len(words)] for j in range(400)))
    return root


def _tiny(corpus, out, *extra):
    return ["pretrain", "--out", str(out), "--quiet", f"data.corpus={corpus}", "data.tokenizer=bytes",
            "data.seq_len=64", "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
            "model.window=8", "model.max_position_embeddings=64", "model.hidden_dropout_prob=0.1",
            "train.batch_size=2", "train.log_every=1", "train.eval_batches=1", "train.warmup_steps=2", *extra]


def _cli(args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "longctx.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


@pytest.mark.slow
def test_flops_budget_run_equals_its_steps_and_a_seconds_budget_resumes_exactly(corpus, tmp_path):
    """A FLOPs budget decides floor(budget / FLOPs per step) steps, recorded in run_config.json. A seconds
    budget killed at its second
    checkpoint (step 2) and resumed keeps the steps its first start measured (not measured again) and ends
    bit-identical to an uninterrupted run of those steps: timing touched neither the weights nor the RNG."""
    flops = _cli(_tiny(corpus, tmp_path / "flops", "train.budget.flops=5e7", "train.save_every=0"))
    assert flops.returncode == 0, flops.stderr[-2000:]
    r = json.loads((tmp_path / "flops" / "results.json").read_text())
    steps = int(5e7 // r["flops_per_step"])
    assert r["steps"] == steps > 1 and r["budget"] == {"flops": 5e7}
    assert r["train_flops"] == pytest.approx(steps * r["flops_per_step"]) and r["train_flops"] <= 5e7
    assert json.loads((tmp_path / "flops" / "run_config.json").read_text())["train"]["steps"] == steps

    timed = _tiny(corpus, tmp_path / "timed", "train.budget.seconds=0.5", "train.save_every=1")
    killed = _cli(timed, {"LONGCTX_FAULT": "save.files:2"})
    assert killed.returncode != 0 and not (tmp_path / "timed" / "results.json").exists()
    decided = json.loads((tmp_path / "timed" / "run_config.json").read_text())["train"]["steps"]
    assert decided > 2, "the machine was too slow for this test's half-second budget"
    resumed = _cli(timed + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rt = json.loads((tmp_path / "timed" / "results.json").read_text())
    assert rt["steps"] == decided and "seconds_per_step" not in rt  # kept, not measured again
    ref = _cli(_tiny(corpus, tmp_path / "ref", f"train.steps={decided}", "train.save_every=0"))
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = _weights(tmp_path / "timed"), _weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compare_under_a_flops_budget_with_a_compute_section(corpus, tmp_path):
    """Full attention costs more per step than a sliding window at 128 tokens: under the same FLOPs budget
    it takes fewer steps. The report's tables and results.json say the same steps, tokens and FLOPs; the
    score-vs-compute plot exists; a rerun skips finished runs."""
    from test_finetune import _files

    qa = {k.split("=")[0].split(".")[1]: k.split("=", 1)[1] for k in _files(tmp_path)}
    comp = {"name": "fl",
            "base": {"model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "window": 8,
                               "max_position_embeddings": 256},
                     "data": {"corpus": str(corpus), "tokenizer": "bytes", "seq_len": 128},
                     "train": {"batch_size": 2, "save_every": 0, "log_every": 1, "eval_batches": 1, "warmup_steps": 2}},
            "variants": [{"name": "full", "set": {"model.attention": "full"}},
                         {"name": "sliding", "set": {"model.attention": "sliding"}}],
            "compute": {"flops": [2.0e8]},
            "finetune": {"qa": {"data": {"seq_len": 256, "tokenizer": "bytes"},
                                "train": {"steps": 2, "batch_size": 2, "save_every": 0},
                                "task": {**qa, "bootstrap": 50}}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(comp))
    args = ["compare", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "runs"), "--quiet"]
    res = _cli(args)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "runs" / "fl"
    summary = json.loads((out / "results.json").read_text())
    runs = {r["compute"]["variant"]: r for r in summary["variants"]}
    assert [r["variant"] for r in summary["variants"]] == ["full-2e8", "sliding-2e8"]
    for r in runs.values():
        assert r["steps"] == int(2.0e8 // r["flops_per_step"]) and r["train_flops"] <= 2.0e8
    assert runs["full"]["flops_per_step"] > runs["sliding"]["flops_per_step"]
    assert runs["full"]["steps"] < runs["sliding"]["steps"]
    assert summary["controlled"]["budget"] == {"flops": [2.0e8]} and summary["controlled"]["steps"] is None
    md = (out / "report.md").read_text()
    for v, r in runs.items():
        f1, (lo, hi) = r["finetune"]["qa"]["test"]["f1"], r["finetune"]["qa"]["test"]["f1_ci"]
        row = (f"| {v} | 2e8 | {r['steps']:,} | {r['tokens']:,} | {r['train_flops']:.3g} | "
               f"{r['eval']['loss']:.3f} [{r['eval']['loss_ci'][0]:.3f}, {r['eval']['loss_ci'][1]:.3f}] | "
               f"{f1:.3f} [{lo:.3f}, {hi:.3f}] |")
        assert row in md, row
        assert f"| {r['steps']:,} | {r['tokens']:,} | {r['train_flops']:.3g} |" in res.stdout
    assert (out / "qa_vs_compute.png").stat().st_size > 1000
    again = _cli(args[:-1])  # with progress: every run says it finished earlier
    assert again.returncode == 0 and again.stderr.count("finished earlier, skipped") == 4, again.stderr[-2000:]
    assert "Warning" not in res.stderr + again.stderr  # nothing for a user to puzzle over


@pytest.mark.parametrize("change, why", [
    ({"base.train.budget": {"flops": 1e9, "seconds": 3}}, "exactly one of flops, seconds, tokens"),
    ({"base.train.budget": {"flops": 1e9}, "base.stages": [{"steps": 2}]}, "cannot be combined with stages"),
    ({"variants.0.set": {"train.budget": {"flops": 1e9}}}, "changes 'train.budget'"),
    ({"base.data": {"seq_len": 256}, "variants.0.set": {"stages": [{"steps": 2, "seq_len": 128}]}},
     "its last phase trains at seq_len=128, not at data.seq_len=256"),
    ({"compute": {"flops": [1e9]}, "base.train.budget": {"flops": 1e9}}, "remove train.budget from base"),
    ({"compute": {"flops": [1e9, 1e9]}}, "distinct positive budgets"),
    ({"compute": {"flops": 1e9}}, "distinct positive budgets"),
    ({"compute": {"watts": [1]}}, "names one unit"),
    ({"compute": {"flops": [1e9]}, "finetune": {"listops": {}}}, "train from scratch"),
])
def test_budget_misuse_is_one_sentence(tmp_path, change, why):
    from longctx.experiments.compare import load_comparison

    raw = {"name": "m", "base": {"train": {}}, "variants": [{"name": "a", "set": {}}, {"name": "b", "set": {}}]}
    for dotted, value in change.items():
        node, *path = dotted.split(".")
        target = raw if not path else raw[node]
        for p in path[:-1]:
            target = target[int(p)] if isinstance(target, list) else target[p]
        target[path[-1] if path else node] = value
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(LongctxError, match=why) as e:
        load_comparison(tmp_path / "c.yaml", [])
    assert len(str(e.value).splitlines()) == 1 and str(e.value).count(". ") == 0, str(e.value)


class _Sequences:
    """The two things ``sample_steps`` asks of a task: training sequences at a length, and their batches."""
    def train_examples(self, n):
        return [torch.randint(5, V, (n,), generator=torch.Generator().manual_seed(i)) for i in range(6)]

    def collate(self, items, **_):
        ids = torch.stack(items)
        return {"input_ids": ids, "labels": ids}


def test_a_staged_runs_flops_are_each_phases_steps_at_its_length_and_window():
    """budget.phase_flops: each phase's step FLOPs at its own length and window (a sliding core's cost grows
    with both), on a copy: the model keeps its windows; a staged run's FLOPs sum phase x steps."""
    from longctx.models import LongctxForCausalLM
    from longctx.train.budget import phase_flops, staged_flops
    from longctx.train.loop import set_windows

    model = _model(LongctxForCausalLM, causal=True, attention="sliding", global_projections=False)
    stages = [{"steps": 5, "seq_len": 16, "window": 2}, {"steps": 3, "seq_len": 32, "window": 4},
              {"steps": 2, "seq_len": 64, "window": 8}]
    cfg = {"seed": 0, "data": {"seq_len": 64}, "train": {"batch_size": 2, "grad_accum": 1}}
    got = phase_flops(model, _Sequences(), cfg, stages, world=1)
    assert model.config.window == W  # untouched
    want = []
    for s in stages:
        import copy
        m = copy.deepcopy(model)
        set_windows(m, s["window"])
        ids = torch.zeros(2, s["seq_len"], dtype=torch.long)
        want.append(step_flops(m, {"input_ids": ids, "labels": ids}))
    assert got == want and got[0] < got[1] / 2 < got[2] / 4  # longer windows cost more per token
    assert staged_flops(got, stages) == 5 * got[0] + 3 * got[1] + 2 * got[2]


def test_the_staged_recipe_spends_the_one_phase_recipes_flops():
    """configs/longformer-charlm-staged-vs-one.yaml: the step counts its comments work out give the two arms
    the same training FLOPs (within 0.01%), counted by the budget module as a run counts them."""
    from pathlib import Path

    from longctx.experiments.compare import load_comparison
    from longctx.models import LongctxForCausalLM
    from longctx.tasks.base import stage_list
    from longctx.train.budget import staged_flops
    from longctx.train.loop import set_windows

    comp = load_comparison(Path(__file__).parents[1] / "configs/longformer-charlm-staged-vs-one.yaml", [])
    spent = {}
    for v in comp["variants"]:
        cfg = v["config"]
        model = LongctxForCausalLM(LongctxConfig(**dict(cfg["model"], vocab_size=261, causal=True)))
        stages = stage_list(cfg) or [{"steps": cfg["train"]["steps"], "seq_len": cfg["data"]["seq_len"], "window": None}]
        assert stages[-1]["seq_len"] == cfg["data"]["seq_len"] == 512  # both end (and are evaluated) at 512
        per = []
        for s in stages:
            if s["window"] is not None:
                set_windows(model, s["window"])
            ids = torch.zeros(cfg["train"]["batch_size"], s["seq_len"], dtype=torch.long)
            per.append(step_flops(model, {"input_ids": ids, "labels": ids}))
        spent[v["name"]] = staged_flops(per, stages)
        assert model.config.window == 64
    assert spent["staged"] == pytest.approx(spent["one-phase"], rel=1e-4)
    assert spent["one-phase"] == 400 * 21_681_930_240  # the figure in the recipe's comments
