"""The study's protocol in `longctx compare`: overrides reach every section, the learning rate is chosen on dev
only, finetuning keeps the best dev weights, a finished run is reused only under the config it was trained
with, pretraining seeds run and line up, and a rerun with one variant deleted reproduces the statistics."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from longctx.errors import LongctxError
from test_train import _FirstTokenParity


def _longctx(args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "longctx.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _tiny_comparison(tmp_path, **extra):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"document {i} " + "some words here and there " * 40)
    comp = {"name": "tiny",
            "base": {"data": {"corpus": str(corpus), "tokenizer": "bytes", "seq_len": 64},
                     "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "window": 4,
                               "max_position_embeddings": 128},
                     "train": {"steps": 2, "batch_size": 2, "save_every": 0, "log_every": 1, "eval_batches": 2}},
            "variants": [{"name": "full", "set": {"model.attention": "full"}},
                         {"name": "sliding", "set": {"model.attention": "sliding", "task.global_tokens": "none"}}],
            "reference": "sliding", **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(comp))
    return path


def test_overrides_reach_every_section_of_a_comparison(tmp_path):
    from longctx.experiments.compare import load_comparison
    path = _tiny_comparison(tmp_path, finetune={"listops": {"lr": [1e-3, 3e-3], "train": {"steps": 5},
                                                            "task": {"train_size": 8}}})
    comp = load_comparison(path, ["train.steps=3", "finetune.listops.train.steps=20", "finetune.listops.task.dev_size=4",
                                  "seeds=2", "reference=full"])
    assert comp["base"]["train"]["steps"] == 3 and comp["seeds"] == [0, 1] and comp["reference"] == "full"
    ft = comp["finetune"]["listops"]  # merged into the mapping, not replacing it
    assert ft["train"]["steps"] == 20 and ft["task"] == {"train_size": 8, "dev_size": 4} and ft["lr"] == [1e-3, 3e-3]
    assert all(v["config"]["data"]["seed"] == 0 for v in comp["variants"])  # the data is the base seed's
    for bad, msg in [("finetune.listops.train.stepz=3", "unknown"), ("seeds=0", "seeds must be"),
                     ("reference=nope", "reference 'nope' is not one of"), ("finetune.listops.lr=[0]", "lr must be")]:
        with pytest.raises(LongctxError, match=msg):
            load_comparison(path, [bad])


def _run(task_runs):
    return [{"lr": lr, "pretraining_seed": s, "seed": s, "dir": f"d{lr}-{s}",
             "result": {"primary_metric": "f1", "from_scratch": False, "steps": 10, "train_time_s": 1.0,
                        "eval": {"f1": dev}, "test": {"f1": test, "examples": 3, "per_example": [test] * 3}}}
            for lr, s, dev, test in task_runs]


def test_learning_rate_is_chosen_on_dev_and_never_reads_test():
    from longctx.experiments.downstream import summarize
    runs = [(1e-3, 0, 0.30, 0.10), (1e-3, 1, 0.40, 0.12), (3e-3, 0, 0.50, 0.05), (3e-3, 1, 0.10, 0.07)]
    chosen = summarize(_run(runs), [1e-3, 3e-3], "question")
    assert chosen["lr"] == 1e-3 and chosen["dev_by_lr"] == {"0.001": pytest.approx(0.35), "0.003": pytest.approx(0.30)}
    assert chosen["test"]["f1"] == pytest.approx(0.11) and chosen["test"]["per_example"] == [[0.10] * 3, [0.12] * 3]
    # test labels poisoned (every other grid point's test score best by far): the choice does not move
    poisoned = [(lr, s, dev, 0.99 if lr == 3e-3 else test) for lr, s, dev, test in runs]
    assert summarize(_run(poisoned), [1e-3, 3e-3], "question")["lr"] == 1e-3
    # a tie on dev goes to the first grid point
    tie = [(1e-3, 0, 0.3, 0.0), (3e-3, 0, 0.3, 1.0)]
    assert summarize(_run(tie), [1e-3, 3e-3], "none")["lr"] == 1e-3


class _ScriptedParity(_FirstTokenParity):
    """The toy task, with dev scores that peak at the first evaluation (step 2) and fall after it."""
    dev_scores = iter([0.9, 0.5, 0.6])

    def evaluate(self, model, split="dev", **kw):
        ev = super().evaluate(model, split, **kw)
        return {**ev, "accuracy": next(self.dev_scores)} if split == "dev" else ev


def test_keep_best_makes_the_best_dev_evaluation_the_model(tmp_path):
    from safetensors.torch import load_file
    from longctx.train.config import resolve
    from longctx.train.trainer import train
    cfg = resolve({}, ["name=toy", "data.seq_len=32", "model.window=4", "model.max_position_embeddings=32",
                       "train.steps=6", "train.batch_size=4", "train.save_every=2", "train.keep_last=5",
                       "train.eval_every=2", "train.keep_best=true", "train.eval_batches=1", "train.lr=3e-3"])
    r = train(cfg, _ScriptedParity(cfg), tmp_path / "run", progress=False)
    assert r["best_step"] == 2 and r["eval"]["accuracy"] == 0.9 and r["steps"] == 6
    model = load_file(tmp_path / "run" / "model" / "model.safetensors")
    at2 = load_file(tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors")
    at6 = load_file(tmp_path / "run" / "checkpoints" / "step-000006" / "model.safetensors")
    assert all(torch.equal(model[k], at2[k]) for k in model)
    assert not all(torch.equal(model[k], at6[k]) for k in model)


@pytest.mark.slow
def test_stale_runs_are_refused_or_rerun_and_seeds_line_up(tmp_path):
    cfg = _tiny_comparison(tmp_path, seeds=2)
    out = tmp_path / "runs"
    res = _longctx(["compare", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert res.returncode == 0, res.stderr[-3000:]
    run = out / "tiny"
    summary = json.loads((run / "results.json").read_text())
    for v in summary["variants"]:  # two seeds, each scored on the same held-out sequences
        assert v["seeds"] == [0, 1] and len(v["eval"]["per_example"]) == 2
        assert len(set(map(len, v["eval"]["per_example"]))) == 1
        assert v["eval"]["loss"] == pytest.approx(sum(v["eval"]["loss_per_seed"]) / 2)
    assert json.loads((run / "full-seed1" / "run_config.json").read_text())["seed"] == 1
    assert json.loads((run / "full-seed1" / "run_config.json").read_text())["data"]["seed"] == 0
    st = summary["study"]["columns"]["pretraining loss"]
    assert st["vs_reference"]["reference"] == "sliding" and set(st["vs_reference"]["rows"]) == {"full"}
    md = (run / "report.md").read_text()
    assert "## What this run shows" in md and "vs sliding (paired)" in md
    # a rerun with one variant's results deleted reproduces every statistic to the last digit
    shutil.rmtree(run / "full")
    res = _longctx(["compare", "--config", str(cfg), "--out", str(out), "--quiet"])
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((run / "results.json").read_text())
    assert again["study"] == summary["study"]
    assert [v["eval"] for v in again["variants"]] == [v["eval"] for v in summary["variants"]]
    # a rerun with a changed config: refused with the keys that differ, nothing deleted
    res = _longctx(["compare", "--config", str(cfg), "--out", str(out), "--quiet", "train.steps=3"])
    assert res.returncode == 2 and "train.steps (2 -> 3)" in res.stderr and "--rerun-changed" in res.stderr
    assert "Traceback" not in res.stderr and (run / "full" / "results.json").exists()
    res = _longctx(["compare", "--config", str(cfg), "--out", str(out), "--quiet", "train.steps=3", "--rerun-changed"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert all(v["steps"] == 3 for v in json.loads((run / "results.json").read_text())["variants"])


@pytest.mark.slow
def test_a_grid_on_the_first_seeds_then_the_choice_on_the_rest(tmp_path):
    """``grid_seeds: 1``: the learning-rate grid runs on the first pretraining seed, the point chosen on its dev
    score on the other seeds; the summary's rows are the chosen point's runs, one per seed, in seed order."""
    listops = {"lr": [1e-3, 3e-3], "grid_seeds": 1, "data": {"seq_len": 32},
               "train": {"steps": 2, "batch_size": 4, "save_every": 0},
               "task": {"train_size": 8, "dev_size": 6, "test_size": 6, "max_depth": 2, "min_length": 3, "max_length": 30,
                        "bootstrap": 20}}
    cfg = _tiny_comparison(tmp_path, seeds=2, finetune={"listops": listops})
    res = _longctx(["compare", "--config", str(cfg), "--out", str(tmp_path / "runs"), "--quiet", "--jobs", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    for v in json.loads((run / "results.json").read_text())["variants"]:
        ft = v["finetune"]["listops"]
        tag = f"{ft['lr']:g}"
        assert sorted(p.name for p in (run / v["variant"]).glob("finetune-*")) == ["finetune-listops-lr0.001",
                                                                                   "finetune-listops-lr0.003"]
        assert [p.name for p in (run / f"{v['variant']}-seed1").glob("finetune-*")] == [f"finetune-listops-lr{tag}"]
        assert set(ft["dev_by_lr"]) == {"0.001", "0.003"} and ft["seeds"] == 2
        assert [r["pretraining_seed"] for r in ft["runs"] if r["lr"] == ft["lr"]] == [0, 1]


def test_variant_overrides_reach_a_variants_set_and_unknown_names_are_refused():
    from longctx.errors import LongctxError
    from longctx.experiments.compare import load_comparison
    from pathlib import Path
    cfg = Path(__file__).parents[1] / "configs" / "longformer-charlm-staged-vs-one.yaml"
    tiny = ("variants.staged.stages=[{steps: 2, seq_len: 128, window: 16, lr: 0.002}, "
            "{steps: 1, seq_len: 512, window: 64, lr: 0.001}]")
    comp = load_comparison(cfg, [tiny, "variants.one-phase.model.window=32", "train.steps=3"])
    staged = next(v for v in comp["variants"] if v["name"] == "staged")["config"]
    one = next(v for v in comp["variants"] if v["name"] == "one-phase")["config"]
    assert [p["steps"] for p in staged["stages"]] == [2, 1] and one["model"]["window"] == 32
    assert one["train"]["steps"] == 3
    with pytest.raises(LongctxError, match="not in this comparison"):
        load_comparison(cfg, ["variants.nosuch.model.window=8"])


def test_an_option_added_later_unset_does_not_make_finished_runs_stale():
    from longctx.experiments.runs import config_diff
    saved = {"config": {"task": {"bootstrap": 1000}}, "after": "abc"}
    assert config_diff(saved, {"config": {"task": {"bootstrap": 1000, "dataset": None}}, "after": "abc"}) == []
    assert config_diff(saved, {"config": {"task": {"bootstrap": 1000, "dataset": "x.json"}}, "after": "abc"}) == [
        'config.task.dataset ("<unset>" -> "x.json")']
    assert config_diff(saved, {"config": {"task": {"bootstrap": 50}}, "after": "abc"}) == [
        "config.task.bootstrap (1000 -> 50)"]


def _synthetic_results(order: dict, seeds: int = 3, examples: int = 60, noise: float = 0.05):
    """Results of 4 variants whose per-example test scores rank them as ``order`` says per task
    ({task: (from_scratch, [quality of each variant])}), ``seeds`` pretraining seeds."""
    import numpy as np

    rng = np.random.default_rng(0)
    variants = ["a", "b", "c", "d"]
    out = []
    for i, v in enumerate(variants):
        ft = {}
        for task, (scratch, quality) in order.items():
            n = examples + (7 if task == "ruler_vt" else 0)  # tasks of different sizes
            rows = np.clip(quality[i] + noise * rng.standard_normal((seeds, n)), 0, 1)
            ft[task] = {"metric": "accuracy" if scratch else "f1", "from_scratch": scratch,
                        "test": {"per_example": rows.tolist()}}
        out.append({"variant": v, "seeds": list(range(seeds)), "eval": {"per_example": None}, "finetune": ft})
    return out


def test_the_ruler_column_pools_its_tasks_and_the_findings_say_which_suite_agrees_with_downstream():
    """Downstream QA and the two RULER tasks rank a > b > c > d, ListOps the reverse: the RULER column holds
    every RULER example side by side per seed, its tau with QA is above 0 and ListOps' below, and the finding
    names RULER (computed from the intervals: swapping the orders names LRA)."""
    import numpy as np

    from longctx.experiments.study import RULER, analyse, columns, suites

    up, down = [0.9, 0.7, 0.5, 0.3], [0.3, 0.5, 0.7, 0.9]
    res = _synthetic_results({"qa": (False, up), "ruler_niah_single": (False, up), "ruler_vt": (False, up),
                              "listops": (True, down)})
    cols = columns(res)
    assert list(cols) == ["qa", "ruler_niah_single", "ruler_vt", RULER, "listops (LRA, from scratch)"]
    for v in "abcd":  # per seed, every RULER task's examples, in the tasks' order
        want = np.concatenate([cols["ruler_niah_single"]["scores"][v], cols["ruler_vt"]["scores"][v]], axis=1)
        assert np.array_equal(cols[RULER]["scores"][v], want) and want.shape == (3, 127)
    st = analyse(res, "a")
    assert st["columns"][RULER]["ranks"] == {"a": 1, "b": 2, "c": 3, "d": 4}
    assert st["kendall_tau"][f"qa vs {RULER}"]["ci"][0] > 0
    assert st["kendall_tau"][f"{RULER} vs listops (LRA, from scratch)"]["ci"][1] < 0
    verdicts = suites(st)["qa"]
    assert (verdicts["RULER"]["verdict"], verdicts["LRA"]["verdict"]) == ("agrees", "disagrees")
    line = next(f for f in st["findings"] if "Which synthetic suite" in f)
    assert "RULER agrees with qa" in line and "LRA: listops (LRA, from scratch) -1.00" in line
    # the orders swapped: the sentence follows the numbers
    res = _synthetic_results({"qa": (False, up), "ruler_niah_single": (False, down), "ruler_vt": (False, down),
                              "listops": (True, up)})
    line = next(f for f in analyse(res, "a")["findings"] if "Which synthetic suite" in f)
    assert "LRA agrees with qa" in line and "RULER: RULER -1.00" in line
    # noise that hides the order: neither is shown to agree
    flat = [0.5] * 4
    res = _synthetic_results({"qa": (False, up), "ruler_niah_single": (False, flat), "ruler_vt": (False, flat),
                              "listops": (True, flat)}, noise=0.3)
    line = next(f for f in analyse(res, "a")["findings"] if "Which synthetic suite" in f)
    assert "no synthetic suite is shown to agree with qa" in line
    # one RULER task: no pooled column, the task stands for its suite
    res = _synthetic_results({"qa": (False, up), "ruler_vt": (False, up), "listops": (True, down)})
    assert RULER not in columns(res) and suites(analyse(res, "a"))["qa"]["RULER"]["verdict"] == "agrees"
