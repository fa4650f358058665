"""Ctrl-C during `longctx compare`, sent as a terminal sends it (SIGINT to the whole foreground process
group), and a cluster's SIGTERM to every process: the variant's child saves a checkpoint however long that takes, the rerun resumes from it, and
the result equals a run that was never interrupted; a second Ctrl-C stops the child without one."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from longctx.train.checkpoint import checkpoint_dirs

WORDS = "attention window token global local block layer sequence model document the of and a to in".split()
# every checkpoint write waits this long: longer than the 0.25 s subprocess.run grants a child after
# Ctrl-C, as a real model's checkpoint takes
SLOW_SAVE = {"LONGCTX_FAULT_DELAY": "save.start:1.5"}


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    corpus = root / "corpus"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(600)))
    base = {"data": {"corpus": str(corpus), "tokenizer": "bytes", "seq_len": 256},
            "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "max_position_embeddings": 256, "hidden_dropout_prob": 0.1},
            "train": {"steps": 40, "batch_size": 2, "save_every": 0, "log_every": 1, "eval_batches": 1}}
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"name": "tiny", "base": base,
                                   "variants": [{"name": "full", "set": {"model.attention": "full"}}]}))
    return cfg


def compare(cfg, out, env_extra=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LONGCTX_CACHE": str(Path(out).parent / "cache"), **(env_extra or {})}
    env.pop("LONGCTX_FAULT", None)
    return subprocess.Popen([sys.executable, "-m", "longctx.cli", "compare", "--config", str(cfg), "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def ctrl_c_after_step(proc, vdir: Path, step: int, sig=signal.SIGINT) -> None:
    """``sig`` to the process group of ``proc`` once the variant has logged ``step``: SIGINT as a terminal's
    Ctrl-C, SIGTERM as SLURM's scancel or a job's time limit (to every process of the job)."""
    metrics = vdir / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and sum(1 for _ in metrics.open()) >= step):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, sig)


@pytest.mark.slow
def test_a_stop_mid_step_saves_and_the_rerun_ends_as_an_uninterrupted_run(comparison, tmp_path):
    ref = compare(comparison, tmp_path / "ref")
    _, err = ref.communicate(timeout=120)
    assert ref.returncode == 0, err
    vdir = tmp_path / "runs" / "tiny" / "full"
    run = compare(comparison, tmp_path / "runs", SLOW_SAVE, start_new_session=True)
    # SIGTERM to every process, as a cluster stops a job: the driver passes it on as it does a Ctrl-C (the
    # Ctrl-C's first request is the next test's), the child takes it once and saves
    ctrl_c_after_step(run, vdir, 3, signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert "full pretraining is saving a checkpoint after the current step; rerunning the same command resumes" in err
    assert "--resume" not in err and "Traceback" not in err
    saved = checkpoint_dirs(vdir)
    assert saved and not (vdir / "results.json").exists()
    step = int(saved[-1].name.split("-")[1])
    assert 3 <= step < 40
    again = compare(comparison, tmp_path / "runs")
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"resuming from {saved[-1]} (step {step})" in err
    a = json.loads((tmp_path / "ref" / "tiny" / "full" / "results.json").read_text())
    b = json.loads((vdir / "results.json").read_text())
    for key in ("steps", "tokens", "final_train_loss", "eval"):
        assert a[key] == b[key], key
    wa, wb = (load_file(d / "tiny" / "full" / "model" / "model.safetensors") for d in (tmp_path / "ref", tmp_path / "runs"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_the_child_without_its_checkpoint(comparison, tmp_path):
    vdir = tmp_path / "runs" / "tiny" / "full"
    run = compare(comparison, tmp_path / "runs", {"LONGCTX_FAULT_DELAY": "save.start:30"}, start_new_session=True)
    ctrl_c_after_step(run, vdir, 2)
    # the second Ctrl-C only after the driver's line about the checkpoint and the child's own: two SIGINTs
    # that reach the child before its handler runs are one to Python (under load the second could be sent
    # then, and the child would save as after a first)
    seen = {"is saving a checkpoint": False, "the run stops after this step": False}
    while not all(seen.values()):  # the child's progress lines come first
        line = run.stderr.readline()
        assert line, f"no line about the checkpoint: {seen}"
        seen = {k: v or k in line for k, v in seen.items()}
    os.killpg(run.pid, signal.SIGINT)
    _, err = run.communicate(timeout=20)  # not the 30 s the checkpoint would take
    assert run.returncode == 130
    assert "second interrupt: [1/1] full pretraining stopped without saving" in err
    assert not checkpoint_dirs(vdir) and not (vdir / "results.json").exists()


@pytest.mark.slow
def test_ctrl_c_in_pretrain_saves_at_a_step_boundary_and_says_to_resume(comparison, tmp_path):
    base = yaml.safe_load(comparison.read_text())["base"]
    out = tmp_path / "run"
    args = [f"{section}.{k}={json.dumps(v)}" for section in ("data", "model", "train") for k, v in base[section].items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LONGCTX_CACHE": str(tmp_path / "cache"), **SLOW_SAVE}
    run = subprocess.Popen([sys.executable, "-m", "longctx.cli", "pretrain", "--out", str(out), *args], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ctrl_c_after_step(run, out, 2)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    saved = checkpoint_dirs(out)
    assert len(saved) == 1 and f"checkpoint of step {int(saved[0].name.split('-')[1])} saved" in err
    assert err.strip().splitlines()[-1] == "longctx pretrain: interrupted; rerun it with --resume to continue from " \
                                           "its last checkpoint"
