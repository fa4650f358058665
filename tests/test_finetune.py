"""`longctx finetune` with the one trainer: a run killed with SIGKILL and resumed ends bit-identical to
an uninterrupted one; `longctx compare` with a finetune section reports downstream scores and rankings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import numpy as np

from longctx.stats import mean_interval
from test_tasks import TINY, _squad_rows, _write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _files(tmp_path):
    return [f"task.{s}_file=" + _write_jsonl(tmp_path / f"{s}.jsonl", _squad_rows(n, i))
            for i, (s, n) in enumerate([("train", 8), ("dev", 3), ("test", 3)])]


def _finetune(out, args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "longctx.cli", "finetune", "--task", "qa", "--out", str(out),
                           "--quiet", *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_finetune_killed_with_sigkill_and_resumed_is_bit_identical(tmp_path):
    args = TINY + _files(tmp_path) + ["train.steps=6", "train.save_every=2"]
    full = _finetune(tmp_path / "full", args)
    assert full.returncode == 0, full.stderr
    # killed while writing the second checkpoint (step 4): resumes from step 2
    killed = _finetune(tmp_path / "killed", args, {"LONGCTX_FAULT": "save.files:2"})
    assert killed.returncode != 0 and not (tmp_path / "killed" / "results.json").exists()
    resumed = _finetune(tmp_path / "killed", args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr
    a = load_file(tmp_path / "full" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)
    ra = json.loads((tmp_path / "full" / "results.json").read_text())
    rb = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert ra["test"]["f1"] == rb["test"]["f1"] and ra["final_train_loss"] == rb["final_train_loss"]


@pytest.mark.slow
def test_compare_with_a_finetune_section(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"document {i} " + "some words here and there " * 40)
    qa_files = {k.split("=")[0].split(".")[1]: k.split("=", 1)[1] for k in _files(tmp_path)}
    comp = {
        "name": "ft",
        "base": {"model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "window": 8,
                           "max_position_embeddings": 256},
                 "data": {"corpus": str(corpus), "tokenizer": "bytes", "seq_len": 128},
                 "train": {"steps": 2, "batch_size": 2, "save_every": 0, "log_every": 1, "eval_batches": 1}},
        "variants": [{"name": "full", "set": {"model.attention": "full"}},
                     {"name": "sliding", "set": {"model.attention": "sliding", "task.global_tokens": "none"}}],
        "finetune": {
            "qa": {"data": {"seq_len": 256, "tokenizer": "bytes"}, "train": {"steps": 2, "batch_size": 2, "save_every": 0},
                   "task": {**qa_files, "bootstrap": 50}},
            "listops": {"seeds": 2, "data": {"seq_len": 64}, "train": {"steps": 2, "batch_size": 2, "save_every": 0},
                        "task": {"train_size": 8, "dev_size": 4, "test_size": 4, "max_depth": 3, "min_length": 3,
                                 "max_length": 40, "bootstrap": 50}}},
    }
    import yaml
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(comp))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "longctx.cli", "compare", "--config", str(tmp_path / "c.yaml"),
                          "--out", str(tmp_path / "runs"), "--quiet"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads((tmp_path / "runs" / "ft" / "results.json").read_text())
    ft = {v["variant"]: v["finetune"] for v in out["variants"]}
    assert ft["full"]["qa"]["global_tokens"] == "question" and ft["sliding"]["qa"]["global_tokens"] == "none"
    assert ft["full"]["listops"]["from_scratch"] and not ft["full"]["qa"]["from_scratch"]
    # two finetuning seeds: the mean of the two runs' accuracies, with an interval over seeds and test examples
    lo = ft["full"]["listops"]
    runs = [json.loads((tmp_path / "runs" / "ft" / "full" / d / "results.json").read_text())
            for d in ("finetune-listops", "finetune-listops-seed1")]
    assert [json.loads((tmp_path / "runs" / "ft" / "full" / d / "run_config.json").read_text())["seed"]
            for d in ("finetune-listops", "finetune-listops-seed1")] == [0, 1]
    accs = [x["test"]["accuracy"] for x in runs]
    assert lo["seeds"] == 2 and lo["test"]["accuracy_per_seed"] == accs
    assert lo["test"]["per_example"] == [x["test"]["per_example"] for x in runs]
    assert lo["test"]["accuracy"] == pytest.approx(sum(accs) / 2) and lo["test"]["accuracy_ci"] == pytest.approx(
        mean_interval(np.array(lo["test"]["per_example"])), nan_ok=True)
    study = out["study"]
    assert set(study["columns"]) == {"pretraining loss", "qa", "listops (LRA, from scratch)"}
    assert all(set(c["ranks"]) == {"full", "sliding"} for c in study["columns"].values())
    assert set(study["kendall_tau"]) == {"pretraining loss vs qa", "pretraining loss vs listops (LRA, from scratch)",
                                         "qa vs listops (LRA, from scratch)"}
    md = (tmp_path / "runs" / "ft" / "report.md").read_text()
    assert "## Downstream (finetuned)" in md and "Kendall's tau" in md and "## What this run shows" in md

    # a rerun where the first variant's finetunings finished earlier (so the second's start after a different
    # history) gives the second variant bit-identical finetuned weights and scores
    import shutil
    run = tmp_path / "runs" / "ft"
    first = {task: load_file(run / "sliding" / f"finetune-{task}" / "model" / "model.safetensors")
             for task in ("qa", "listops")}
    for task in first:
        shutil.rmtree(run / "sliding" / f"finetune-{task}")
    (run / "results.json").unlink()
    res = subprocess.run([sys.executable, "-m", "longctx.cli", "compare", "--config", str(tmp_path / "c.yaml"),
                          "--out", str(tmp_path / "runs"), "--quiet"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    again = {v["variant"]: v["finetune"] for v in json.loads((run / "results.json").read_text())["variants"]}
    for task, a in first.items():
        assert again["sliding"][task]["test"] == ft["sliding"][task]["test"]
        b = load_file(run / "sliding" / f"finetune-{task}" / "model" / "model.safetensors")
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_variant_may_not_change_the_finetuning_budget(tmp_path):
    from longctx.errors import LongctxError
    from longctx.experiments.downstream import split_variant_sets
    assert split_variant_sets("v", {"model.window": 4, "task.global_tokens": "none"}) == (
        {"model.window": 4}, {"global_tokens": "none"})
    with pytest.raises(LongctxError, match="may set only task.global_tokens"):
        split_variant_sets("v", {"task.train_size": 4})


def test_finetune_seeds_must_be_a_whole_number_of_runs():
    from longctx.errors import LongctxError
    from longctx.experiments.downstream import check_spec
    assert check_spec({"qa": {"seeds": 3}})["qa"]["seeds"] == 3
    for bad in (0, 1.5, "3", True):
        with pytest.raises(LongctxError, match=r"^finetune.qa.seeds must be a whole number"):
            check_spec({"qa": {"seeds": bad}})
