"""Training: exact resume after SIGKILL, two processes, staged phases, clear errors, the comparison."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORDS = ("attention window token global local block layer sequence model document section heading "
         "train eval memory speed the of and a to in is it that for on with as by").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small folder corpus made here: 40 documents of pseudo-text."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) for _ in range(6))
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}\n\n{text}\n")
    return root


def _env(tmp_path):
    env = dict(os.environ, LONGCTX_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env.pop("CI", None)
    return env


def _args(corpus, out, steps=12, extra=()):
    return ["pretrain", "--out", str(out), "--quiet", f"data.corpus={corpus}", "data.tokenizer=bytes",
            "data.seq_len=128", "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
            "model.window=8", "model.max_position_embeddings=128", "model.hidden_dropout_prob=0.1",
            f"train.steps={steps}", "train.batch_size=2", "train.save_every=1", "train.keep_last=2",
            "train.log_every=1", "train.eval_batches=2", "train.warmup_steps=3", *extra]


def _longctx(args, env, **kw):
    return subprocess.run([sys.executable, "-m", "longctx.cli", *args], env=env, capture_output=True, text=True, **kw)


def _weights(out):
    return load_file(str(Path(out) / "model" / "model.safetensors"))


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(corpus, tmp_path):
    env = _env(tmp_path)
    ref = _longctx(_args(corpus, tmp_path / "ref"), env)
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(3, 9)
    proc = subprocess.Popen([sys.executable, "-m", "longctx.cli", *_args(corpus, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in metrics.open()) >= kill_at:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists()
    resumed = _longctx(_args(corpus, out) + ["--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((out / "results.json").read_text())["steps"] == 12


@pytest.mark.parametrize("extra,message", [
    (["data.corpus=/no/such/folder"], "does not exist"),
    (["train.stepz=3"], "unknown config key 'train.stepz'"),
    (["model.window=100"], "larger than the sequence"),
    (["train.steps=ten"], "'train.steps' expects int"),
    (["data.global_tokens=some"], "must be one of none, first, headings"),
    (["train.lr=0"], "'train.lr' must be > 0"),
])
def test_user_errors_are_one_clear_sentence(corpus, tmp_path, extra, message, capsys, monkeypatch):
    from longctx.cli import main
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    assert main(_args(corpus, tmp_path / "err") + extra) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "err" / "checkpoints").exists()


@pytest.mark.slow
def test_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    res = _longctx(_args(empty, tmp_path / "out"), _env(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "empty" in res.stderr.lower() or "no documents" in res.stderr.lower(), res.stderr


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    res = _longctx(_args(corpus, tmp_path / "nan", steps=8, extra=["train.lr=1e30", "train.clip=0.0",
                                                                    "train.warmup_steps=1"]), _env(tmp_path))
    assert res.returncode == 2, res.stderr[-2000:]
    assert "loss became" in res.stderr and "Traceback" not in res.stderr
    for ckpt in (tmp_path / "nan" / "checkpoints").glob("step-*"):
        weights = load_file(str(ckpt / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), ckpt


@pytest.mark.slow
def test_staged_training_doubles_length_and_window(corpus, tmp_path):
    res = _longctx(_args(corpus, tmp_path / "staged", steps=6, extra=[
        "data.seq_len=64", "model.window=4", "stages={preset: double, phases: 2, steps: 3}"]), _env(tmp_path))
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads((tmp_path / "staged" / "model" / "config.json").read_text())
    assert cfg["window"] == 8
    result = json.loads((tmp_path / "staged" / "results.json").read_text())
    assert result["seq_len"] == 128 and result["tokens"] == 3 * 2 * 64 + 3 * 2 * 128
    per = result["phase_flops_per_step"]  # each phase at its length and window: the run's FLOPs sum them
    assert len(per) == 2 and per[1] > 2 * per[0] and result["train_flops"] == pytest.approx(3 * per[0] + 3 * per[1])
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "staged" / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["type"] == "train"]
    assert lrs[3] < lrs[2]  # the second phase runs at half the learning rate


@pytest.mark.slow
def test_compare_runs_variants_identically_and_resumes(corpus, tmp_path):
    cfg = tmp_path / "cmp.yaml"
    base = {"data": {"corpus": str(corpus), "tokenizer": "bytes", "seq_len": 128},
            "model": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "window": 8,
                      "max_position_embeddings": 128},
            "train": {"steps": 3, "batch_size": 2, "save_every": 0, "log_every": 1, "eval_batches": 2}}
    import yaml
    cfg.write_text(yaml.safe_dump({"name": "tiny", "base": base, "variants": [
        {"name": "full", "set": {"model.attention": "full"}},
        {"name": "blocks", "set": {"model.attention": "blocks", "model.block": 32}}]}))
    env = _env(tmp_path)
    res = _longctx(["compare", "--config", str(cfg), "--out", str(tmp_path / "runs"), "--quiet"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "tiny"
    summary = json.loads((run / "results.json").read_text())
    assert [v["variant"] for v in summary["variants"]] == ["full", "blocks"]
    assert len({v["tokens"] for v in summary["variants"]}) == 1
    for v in summary["variants"]:
        assert v["eval"]["loss"] > 0 and v["peak_memory_bytes"] > 0 and v["tokens_per_s"] > 0
    # full attention does ~4x the attention work of 32-token blocks at length 128
    flops = {v["variant"]: v["attention_flops_per_token"] for v in summary["variants"]}
    assert flops["full"] == pytest.approx(4 * flops["blocks"])
    for f in ("report.md", "loss_vs_steps.png", "loss_vs_time.png", "speed_memory.png"):
        assert (run / f).exists()
    assert "| blocks |" in (run / "report.md").read_text()
    # a rerun skips finished variants
    before = (run / "full" / "results.json").stat().st_mtime
    res = _longctx(["compare", "--config", str(cfg), "--out", str(tmp_path / "runs")], env)
    assert res.returncode == 0 and "finished earlier, skipped" in res.stderr
    assert (run / "full" / "results.json").stat().st_mtime == before
    # a variant may not change the controlled conditions
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": base, "variants": [{"name": "x", "set": {"train.steps": 5}}]}))
    res = _longctx(["compare", "--config", str(bad), "--out", str(tmp_path / "runs")], env)
    assert res.returncode == 2 and "keeps data, seed and budget identical" in res.stderr


@pytest.mark.slow
def test_eval_extrapolation_lengths_blockwise_and_resolution(corpus, tmp_path):
    env = _env(tmp_path)
    out = tmp_path / "lex"
    res = _longctx(_args(corpus, out, steps=3, extra=["objective=clm", "model.position=xpos", "model.attention=full",
                                                      "model.norm=pre", "model.max_position_embeddings=512"]), env)
    assert res.returncode == 0, res.stderr[-2000:]
    report = tmp_path / "lex.json"
    res = _longctx(["eval", str(out / "model"), f"data.corpus={corpus}", "train.eval_batches=1",
                    "--lengths", "64,256", "--blockwise", "64", "--resolution", "--json", str(report)], env)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(report.read_text())
    assert [r["length"] for r in rows] == [64, 256]
    for r in rows:
        assert r["loss"] > 0 and "bits_per_char" in r and 0 <= r["attention_resolution"] <= 1


class _FirstTokenParity:
    """A toy finetuning task for the trainer's contract: the label is the parity of the first token
    (global, so every position can reach it)."""

    name, primary_metric, higher_is_better, global_tokens = "toy-parity", "accuracy", True, "first"
    final_splits = ("dev", "test")

    def __init__(self, cfg):
        self.cfg, self.tokenizer = cfg, None

    def prepare(self):
        g = torch.Generator().manual_seed(self.cfg["seed"])
        self.data = {s: torch.randint(3, 40, (n, 32), generator=g) for s, n in (("train", 64), ("dev", 16), ("test", 16))}

    def build_model(self, init_from=None):
        from longctx.models import LongctxConfig, LongctxForSequenceClassification
        return LongctxForSequenceClassification(LongctxConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, window=4, num_labels=2,
            max_position_embeddings=32, hidden_dropout_prob=0.1))

    def train_examples(self, seq_len):
        return [{"input_ids": x[:seq_len]} for x in self.data["train"]]

    def eval_examples(self, split, seq_len):
        return [{"input_ids": x[:seq_len]} for x in self.data[split]]

    def collate(self, examples, batch_index, rank=0):
        ids = torch.stack([e["input_ids"] for e in examples])
        glob = torch.zeros_like(ids, dtype=torch.bool)
        glob[:, 0] = True
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "global_attention_mask": glob,
                "labels": ids[:, 0] % 2}

    def evaluate(self, model, split="dev", *, seq_len=None, device=None, allow_empty=False, **kw):
        model.eval()
        batch = self.collate(self.eval_examples(split, seq_len), 0)
        with torch.no_grad():
            pred = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
        model.train()
        return {"accuracy": float((pred == batch["labels"]).float().mean()), "examples": len(pred)}


def test_trainer_runs_any_task_and_resumes_it_exactly(tmp_path):
    """The one trainer on a non-LM task: checkpoints, exact resume, evaluation of each final split."""
    from longctx.train.config import resolve
    from longctx.train.trainer import train
    cfg = resolve({}, ["name=toy", "data.seq_len=32", "model.window=4", "model.max_position_embeddings=32",
                       "train.steps=6", "train.batch_size=4", "train.save_every=1", "train.log_every=1",
                       "train.eval_every=3", "train.eval_batches=1", "train.warmup_steps=1", "train.lr=3e-3"])
    ref = train(cfg, _FirstTokenParity(cfg), tmp_path / "ref", progress=False)
    assert ref["steps"] == 6 and ref["tokens"] == 6 * 4 * 32 and ref["primary_metric"] == "accuracy"
    assert 0 <= ref["eval"]["accuracy"] <= 1 and ref["eval_test"]["examples"] == 16
    init = _FirstTokenParity(cfg).build_model()
    trained = _weights(tmp_path / "ref")
    assert not torch.equal(trained["classifier.weight"], init.state_dict()["classifier.weight"])
    # killed after step 2's checkpoint (checkpoints are atomic: any kill leaves such a prefix)
    out = tmp_path / "killed"
    shutil.copytree(tmp_path / "ref", out)
    for c in (out / "checkpoints").iterdir():
        if int(c.name.split("-")[1]) > 2:
            shutil.rmtree(c)
    shutil.rmtree(out / "model")
    (out / "results.json").unlink()
    resumed = train(cfg, _FirstTokenParity(cfg), out, resume=True, progress=False)
    assert resumed["eval"] == ref["eval"] and resumed["eval_test"] == ref["eval_test"]
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if r["type"] == "eval"] == [3, 6]


def test_fused_kernel_loads_before_the_first_timed_step(tmp_path, monkeypatch):
    """The fused CPU kernel's first use (a build or a cached load: seconds) happens before the trainer starts
    its clock, not inside the first step, where it would count in the run's tokens/s."""
    from longctx.attention import dispatch
    from longctx.train import trainer as trainer_mod
    from longctx.train.config import resolve
    events = []
    real_use, real_step = dispatch.prepare_fused, trainer_mod.Trainer.step
    monkeypatch.setattr(dispatch, "prepare_fused", lambda: events.append("kernel") or real_use())
    monkeypatch.setattr(trainer_mod.Trainer, "step", lambda self: events.append("step") or real_step(self))
    cfg = resolve({}, ["name=toy", "data.seq_len=32", "model.window=4", "model.max_position_embeddings=32",
                       "train.steps=2", "train.batch_size=4", "train.eval_every=0", "train.eval_batches=1",
                       "train.warmup_steps=1"])
    trainer_mod.train(cfg, _FirstTokenParity(cfg), tmp_path / "run", progress=False)
    assert "step" in events and events.index("kernel") < events.index("step"), events
