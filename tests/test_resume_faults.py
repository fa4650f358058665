"""Runs that are killed, damaged, doubled or changed: nothing lost, the right checkpoint resumed, and a
run killed anywhere (checkpoint writes included) ends bit-identical to one that never stopped."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longctx.cli import main
from longctx.train.checkpoint import checkpoint_dirs, lock_run, verify_checkpoint

WORDS = ("attention window token global local block layer sequence model document section heading "
         "train eval memory speed the of and a to in is it that for on with as by").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    for i in range(20):
        text = "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 80))) for _ in range(3))
        (root / f"doc{i:02d}.txt").write_text(f"Document {i}\n\n{text}\n")
    return root


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGCTX_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("LONGCTX_FAULT", raising=False)
        yield


def tiny(corpus, out, steps=5, extra=()):
    return ["pretrain", "--out", str(out), "--quiet", f"data.corpus={corpus}", "data.tokenizer=bytes",
            "data.seq_len=64", "model.hidden_size=16", "model.num_hidden_layers=1", "model.num_attention_heads=2",
            "model.window=8", "model.max_position_embeddings=64", "model.hidden_dropout_prob=0.1",
            f"train.steps={steps}", "train.batch_size=1", "train.save_every=1", "train.keep_last=3",
            "train.log_every=1", "train.eval_batches=1", "train.warmup_steps=2", *extra]


def weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def same_weights(a, b) -> bool:
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train_rows(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "train"]


@pytest.fixture(scope="module")
def finished(corpus, tmp_path_factory):
    """A finished 5-step run: the reference every resumed run must equal bit for bit."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(tiny(corpus, out)) == 0
    return out


def killed_after(finished, tmp_path, step):
    """A copy of the reference as a run killed just after checkpoint ``step`` was written."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for c in checkpoint_dirs(out):
        if int(c.name.split("-")[1]) > step:
            shutil.rmtree(c)
    for p in ("model", "results.json", "loss.png"):
        shutil.rmtree(out / p) if (out / p).is_dir() else (out / p).unlink(missing_ok=True)
    return out


# --- item 3: one writer per run folder ---
def test_second_writer_is_refused_and_a_dead_writer_leaves_no_lock(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    held = lock_run(out)  # a run in progress
    try:
        assert main(tiny(corpus, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is being written by another run" in err[0] and str(os.getpid()) in err[0]
        assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()  # nothing written
    finally:
        held.close()
    # a writer killed with SIGKILL: the kernel drops its lock, the next run proceeds
    code = (f"from longctx.train.checkpoint import lock_run; import time; f = lock_run({str(out)!r}); "
            "print(1, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "1"
    assert main(tiny(corpus, out, steps=2)) == 2  # still held
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(tiny(corpus, out, steps=2)) == 0
    assert train_rows(out) == [1, 2]


# --- item 4: killed after the last checkpoint, before model/; resume of a finished run ---
def test_run_killed_after_its_last_checkpoint_finishes_on_resume(finished, corpus, tmp_path, capsys):
    out = killed_after(finished, tmp_path, 5)
    assert main(tiny(corpus, out) + ["--resume"]) == 0
    assert same_weights(out / "model", finished / "model")
    result = json.loads((out / "results.json").read_text())
    assert result["steps"] == 5 and result["eval"] == json.loads((finished / "results.json").read_text())["eval"]
    assert train_rows(out) == [1, 2, 3, 4, 5]
    # --resume of a finished run: says so, exit 0, rewrites nothing
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(tiny(corpus, out) + ["--resume"]) == 0
    assert "finished earlier" in capsys.readouterr().err
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(list((out / "tb").iterdir())) >= 1 and train_rows(out) == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_compare_finishes_a_variant_killed_after_its_last_checkpoint(corpus, tmp_path):
    import yaml
    base = {"data": {"corpus": str(corpus), "tokenizer": "bytes", "seq_len": 64},
            "model": {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "window": 8,
                      "max_position_embeddings": 64},
            "train": {"steps": 2, "batch_size": 1, "save_every": 1, "log_every": 1, "eval_batches": 1}}
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(yaml.safe_dump({"name": "tiny", "base": base, "variants": [
        {"name": "full", "set": {"model.attention": "full"}}]}))
    args = ["compare", "--config", str(cfg), "--out", str(tmp_path / "runs"), "--quiet"]
    assert main(args) == 0
    vdir = tmp_path / "runs" / "tiny" / "full"
    first = weights(vdir / "model")
    shutil.rmtree(vdir / "model")
    (vdir / "results.json").unlink()
    assert main(args) == 0
    assert (vdir / "results.json").exists()
    again = weights(vdir / "model")
    assert all(torch.equal(first[k], again[k]) for k in first)


# --- item 5: a resume compares the configs ---
def test_resume_refuses_config_changes_that_alter_the_run_and_names_each(finished, corpus, tmp_path, capsys):
    out = killed_after(finished, tmp_path, 3)
    before = {c.name: verify_checkpoint(c) for c in checkpoint_dirs(out)}
    changed = tiny(corpus, out, extra=["model.num_attention_heads=4", "train.lr=0.5", "data.seq_len=32",
                                       "model.attention=full", "model.hidden_size=32"])
    capsys.readouterr()
    assert main(changed + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for key in ("model.num_attention_heads (2 -> 4)", "train.lr (0.001 -> 0.5)", "data.seq_len (64 -> 32)",
                'model.attention ("sliding" -> "full")', "model.hidden_size (16 -> 32)"):
        assert key in err[0], (key, err[0])
    assert "remove" not in err[0] and "delete" not in err[0]
    assert {c.name: verify_checkpoint(c) for c in checkpoint_dirs(out)} == before  # nothing touched
    assert not (out / "model").exists()
    # safe changes are allowed, and said
    assert main(tiny(corpus, out, extra=["train.log_every=2", "train.eval_batches=2"]) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "train.log_every (1 -> 2)" in err and "train.eval_batches (1 -> 2)" in err and "allowed" in err
    assert same_weights(out / "model", finished / "model")


def test_resume_refuses_a_changed_train_steps_unless_asked_to_extend(finished, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    capsys.readouterr()
    # train.steps sets the learning-rate schedule: changed silently, the run would follow neither schedule
    for steps in (7, 4):
        assert main(tiny(corpus, out, steps=steps) + ["--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"train.steps (5 -> {steps})" in err[0] and "learning-rate schedule" in err[0]
        assert ("train.extend=true" in err[0]) == (steps > 5), err[0]
    assert json.loads((out / "results.json").read_text())["steps"] == 5
    # asked to: the schedule is recomputed over the new total and the run says what it becomes (linear
    # decay after 2 warm-up steps: over 5 steps the 6th would run at 0, over 7 at 2/5 of train.lr)
    assert main(tiny(corpus, out, steps=7, extra=["train.extend=true"]) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "extending the run from 5 to 7 steps (train.extend)" in err, err
    assert "step 6 runs at 4.00e-04 (the old schedule's 0.00e+00)" in err, err
    assert json.loads((out / "results.json").read_text())["steps"] == 7
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["type"] == "train"]
    assert lrs[5:] == pytest.approx([2e-4, 0.0])  # the new schedule's, logged after each step
    assert not same_weights(out / "model", finished / "model")


# --- item 6: checksums, fallback to the newest intact checkpoint ---
def _truncate(p):
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[:len(data) // 2])


def _empty_rng(p):
    (p / "rng.pt").write_bytes(b"")


def _empty_state(p):
    (p / "state.json").write_text("{}")


def _bit_flip(p):
    data = bytearray((p / "model.safetensors").read_bytes())
    data[-7] ^= 0x40  # an exponent bit of the last weight: loads fine, trains into garbage
    (p / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _empty_rng, _empty_state, _bit_flip])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(finished, corpus, tmp_path, capsys, damage):
    out = killed_after(finished, tmp_path, 4)
    damage(out / "checkpoints" / "step-000004")
    capsys.readouterr()
    assert main(tiny(corpus, out) + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "step-000004" in err and "resuming from step-000003" in err, err
    assert same_weights(out / "model", finished / "model")  # nothing of the damaged one was used
    assert train_rows(out) == [1, 2, 3, 4, 5]
    assert all(verify_checkpoint(c) is None for c in checkpoint_dirs(out))  # the damaged one was rewritten


def test_no_intact_checkpoint_is_refused_without_deleting_anything(finished, corpus, tmp_path, capsys):
    out = killed_after(finished, tmp_path, 4)
    for c in checkpoint_dirs(out):
        _empty_rng(c)
    names = [c.name for c in checkpoint_dirs(out)]
    capsys.readouterr()
    assert main(tiny(corpus, out) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(n in err[0] for n in names) and "rng.pt" in err[0]
    assert [c.name for c in checkpoint_dirs(out)] == names


# --- items 7 and 8: leftovers of a kill, a torn metrics line ---
def test_start_cleans_temporaries_and_tolerates_a_torn_metrics_line(finished, corpus, tmp_path):
    out = killed_after(finished, tmp_path, 3)
    for tmp in (out / "checkpoints" / ".tmp-abc123", out / ".tmp-model-xyz"):
        shutil.copytree(out / "checkpoints" / "step-000003", tmp)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 4, "lo')  # cut by the kill
    assert main(tiny(corpus, out) + ["--resume"]) == 0
    assert not list(out.rglob(".tmp-*"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # all parse
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5]
    assert same_weights(out / "model", finished / "model")
    from longctx.io import read_jsonl
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "tr')
    assert len(read_jsonl(out / "metrics.jsonl")) == len(rows)


# --- item 13: no metrics from nothing ---
def test_no_held_out_tokens_is_never_a_loss_of_zero(finished, corpus, tmp_path, capsys):
    capsys.readouterr()
    assert main(tiny(corpus, tmp_path / "zero", extra=["train.eval_batches=0"])) == 2
    err = capsys.readouterr().err
    # refused before anything is trained (by the config check or the trainer), naming the key
    assert len(err.strip().splitlines()) == 1 and "train.eval_batches" in err
    assert not (tmp_path / "zero" / "checkpoints").exists()
    # a masking rate that picks no held-out token: refused by eval, reported as such by training
    res = main(["eval", str(finished / "model"), f"data.corpus={corpus}", "data.seq_len=64", "model.window=8",
                "data.mlm_probability=0.000001", "train.eval_batches=1"])
    out = capsys.readouterr()
    assert res == 2 and "no held-out tokens" in out.err and "0.0000" not in out.out
    from longctx.data.collate import MLMCollator
    from longctx.data.packing import PackedDataset, prepare_data
    from longctx.models import LongctxForMaskedLM
    from longctx.tasks.mlm import lm_loss
    data = prepare_data(str(corpus), "bytes")
    model = LongctxForMaskedLM.from_pretrained(finished / "model")
    ds = PackedDataset(data.valid, 64)
    ev = lm_loss(model, ds, MLMCollator(data.tokenizer, 1e-6), 1, 1, allow_empty=True)
    assert ev == {"loss": None, "perplexity": None, "eval_tokens": 0}
    ev = lm_loss(model, ds, MLMCollator(data.tokenizer, 0.15), 1, 1)
    assert ev["eval_tokens"] > 0 and ev["loss"] > 0


# --- the fault injection: SIGKILL at 30 moments, checkpoint writes included ---
DRIVER = textwrap.dedent("""
    import json, os, random, signal, sys, time
    import torch
    torch.set_num_threads(1)
    import accelerate, matplotlib.pyplot, torch.utils.tensorboard  # noqa: F401  (imported once, before forking)
    import longctx.models, longctx.tasks.mlm, longctx.train.trainer  # noqa: F401
    from longctx.cli import main

    argv, plan, logdir = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]

    def start(i, env=None):
        pid = os.fork()
        if pid == 0:
            fd = os.open(f"{logdir}/attempt{i}.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.environ.update(env or {})
            code = 1
            try:
                code = main(argv)
            except BaseException:
                import traceback
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        return pid

    def outcome(status):
        if os.WIFSIGNALED(status):
            return "killed" if os.WTERMSIG(status) == 9 else f"signal {os.WTERMSIG(status)}"
        return os.WEXITSTATUS(status)

    # time a run in a scratch folder: to reach setup's end, then the end
    scratch, out_i = list(argv), argv.index("--out") + 1
    scratch[out_i] = logdir + "/scratch"
    steps = int(next(a for a in argv if a.startswith("train.steps=")).split("=")[1])

    def done_steps():
        root = os.path.join(argv[out_i], "checkpoints")
        names = [n for n in os.listdir(root) if n.startswith("step-")] if os.path.isdir(root) else []
        return max((int(n[5:]) for n in names), default=0)
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
        fd = os.open(os.devnull, os.O_WRONLY); os.dup2(fd, 1); os.dup2(fd, 2)
        os._exit(main(scratch))
    first_row, metrics = None, logdir + "/scratch/metrics.jsonl"
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if first_row is None and os.path.exists(metrics) and os.path.getsize(metrics):
            first_row = time.time() - t0
        time.sleep(0.002)
    total = time.time() - t0
    first_row = first_row or total / 2
    step_s = (total - first_row) / steps  # one step and its checkpoint
    rng = random.Random(plan["seed"])
    report = []
    for i, (kind, arg) in enumerate(plan["attempts"]):
        if kind == "hook":
            pid = start(i, {"LONGCTX_FAULT": arg})
            _, status = os.waitpid(pid, 0)
        else:  # a random moment: in setup, or a random time after a random number of further checkpoints
            left = len(plan["attempts"]) - i
            advance = rng.randint(0, max(0, (steps - done_steps()) // left))  # leaves steps for the attempts after
            target, pause = done_steps() + advance, rng.uniform(0, step_s)
            delay = rng.uniform(0, 1.2 * first_row)
            pid = start(i)
            t0, reached = time.time(), None
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                now = time.time()
                if advance and reached is None and done_steps() >= target:
                    reached = now
                if (not advance and now - t0 >= delay) or (reached is not None and now - reached >= pause):
                    os.kill(pid, signal.SIGKILL)
                    _, status = os.waitpid(pid, 0)
                    break
                time.sleep(0.002)
        report.append([kind, arg, outcome(status)])
    print(json.dumps({"report": report, "setup_s": first_row, "run_s": total}))
""")

HOOKS = ["save.start", "save.model", "save.files", "save.manifest", "save.renamed", "save.prune"]


@pytest.mark.slow
def test_sigkill_at_30_moments_then_resume_ends_bit_identical(corpus, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # same threads as the forked attempts
    env.pop("LONGCTX_FAULT", None)
    steps = 40
    ref = subprocess.run([sys.executable, "-m", "longctx.cli", *tiny(corpus, tmp_path / "ref", steps)], env=env,
                         capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]

    seed = int(os.environ.get("LONGCTX_FAULT_SEED") or random.randrange(10**6))  # printed on failure
    rng = random.Random(seed)
    attempts = [["random", 0] for _ in range(21)]
    for point in HOOKS:  # inside the checkpoint write, at the n-th save of that attempt
        attempts.insert(rng.randrange(len(attempts) + 1), ["hook", f"{point}:{rng.randint(1, 3)}"])
    attempts += [["hook", "finish.start:1"], ["hook", "finish.model:1"], ["hook", "finish.plot:1"]]
    assert len(attempts) == 30
    out = tmp_path / "killed"
    logs = tmp_path / "logs"
    logs.mkdir()
    argv = tiny(corpus, out, steps) + ["--resume"]
    drv = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argv), json.dumps({"seed": seed, "attempts": attempts}),
                          str(logs)], env=env, capture_output=True, text=True, timeout=600)
    assert drv.returncode == 0, drv.stderr[-3000:]
    summary = json.loads(drv.stdout.strip().splitlines()[-1])
    (logs / "summary.json").write_text(json.dumps(summary))
    report = summary["report"]
    for i, (kind, arg, how) in enumerate(report):  # every attempt was killed, or ended cleanly: none failed
        assert how in ("killed", 0), (seed, i, kind, arg, how, (logs / f"attempt{i}.txt").read_text()[-2000:])
    kills = sum(how == "killed" for _, _, how in report)
    assert kills >= 25, (seed, report)
    for phase in ("save.", "finish."):  # kills inside checkpoint writes and inside the final outputs
        assert any(how == "killed" for kind, arg, how in report if kind == "hook" and arg.startswith(phase)), report

    final = subprocess.run([sys.executable, "-m", "longctx.cli", *argv], env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    assert not list(out.rglob(".tmp-*"))
    assert same_weights(out / "model", tmp_path / "ref" / "model"), seed
    assert train_rows(out) == list(range(1, steps + 1))  # each step logged once: nothing lost, nothing doubled
    assert json.loads((out / "results.json").read_text())["eval"] == json.loads(
        (tmp_path / "ref" / "results.json").read_text())["eval"]
