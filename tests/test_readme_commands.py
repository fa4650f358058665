"""The README's `longctx eval` command lines run exactly as printed (on tiny stand-in models saved where
the LeX recipe would put its models)."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from longctx.cli import main
from longctx.models import LongctxConfig, LongctxForCausalLM

ROOT = Path(__file__).parents[1]


def readme_eval_lines() -> list[str]:
    """Every `longctx eval` line of a README code block that names a model folder under runs/."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line.strip() for b in blocks for line in b.splitlines() if line.strip().startswith("longctx eval runs/")]


def test_the_readme_has_eval_examples():
    lines = readme_eval_lines()
    assert len(lines) >= 2 and any("--blockwise" in line for line in lines) and any("--config" in line for line in lines)


@pytest.mark.parametrize("line", readme_eval_lines())
def test_readme_eval_line_runs_as_printed(line, tmp_path, monkeypatch, capsys):
    argv = shlex.split(line, comments=True)[1:]
    folder = Path(argv[1])  # runs/lex/<position>/model
    torch.manual_seed(0)
    model = LongctxForCausalLM(LongctxConfig(vocab_size=261, hidden_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, causal=True, norm="pre",
                                             position=folder.parent.name, attention="full",
                                             max_position_embeddings=1024))
    model.save_pretrained(tmp_path / folder)
    (tmp_path / folder.parent / "results.json").write_text(json.dumps({"seq_len": 128}))
    (tmp_path / folder.parent / "run_config.json").write_text(json.dumps(  # as `compare` writes it
        {"data": {"corpus": "default", "tokenizer": "bytes", "seq_len": 128}}))
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    out = capsys.readouterr().out
    lengths = [int(n) for n in argv[argv.index("--lengths") + 1].split(",")]
    assert [int(m) for m in re.findall(r"^length +(\d+):", out, re.M)] == lengths
    if "--blockwise" in argv:
        assert "blocks of 64" in out  # half the training length


def readme_command_lines() -> list[str]:
    """Every `longctx ...` line of the README's bash blocks (continuations joined)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = []
    for b in blocks:
        for line in b.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("longctx "):
                lines.append(line)
    return lines


def _is_synopsis(line: str) -> bool:
    """A usage synopsis with placeholders (MODEL_DIR, [--flag], A | B, ...) rather than a command."""
    code = line.split("#")[0]
    return bool(re.search(r" \[|\.\.\.|\|| [A-Z][A-Z_]{2,}\b", code))


@pytest.mark.parametrize("line", [l for l in readme_command_lines() if not _is_synopsis(l)])
def test_readme_command_line_parses_as_printed(line):
    """Commands printed without placeholders name real subcommands and flags (argparse exits 2 on any
    unknown one); their KEY=VALUE overrides are accepted by the config checks where the command has them."""
    from longctx.cli import build_parser
    argv = shlex.split(line, comments=True)[1:]
    args = build_parser().parse_args(argv)
    assert callable(getattr(args, "func", None)), line
    if args.command == "pretrain":
        from longctx.train.config import load_yaml, resolve
        resolve(load_yaml(ROOT / args.config) if args.config else {}, args.overrides)
    elif args.command == "compare":
        from longctx.experiments.compare import load_comparison
        load_comparison(ROOT / args.config if args.config else None, args.overrides)


def test_readme_synopses_name_real_subcommands():
    from longctx.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for line in readme_command_lines():
        assert line.split()[1] in sub.choices, line
