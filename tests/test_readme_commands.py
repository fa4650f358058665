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
