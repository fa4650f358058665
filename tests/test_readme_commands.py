"""Every `longctx ...` command printed in README.md and docs/*.md, in a bash block or quoted in the prose,
names real subcommands and flags, and its KEY=VALUE overrides pass the config checks of its command.
(tests/test_docs_commands.py runs the bash blocks' commands; this checks the prose's too, in a second.)"""
import re
import shlex
from pathlib import Path

import pytest
from test_docs_commands import code_blocks

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def printed_commands() -> list[tuple[str, str]]:
    """(file name, command): bash-block lines (continuations joined) and `longctx ...` code spans in prose."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for block in [b for lang, b in code_blocks(text) if lang == "bash"]:
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+", " ", line.strip())
                if line.startswith("longctx "):
                    out.append((doc.name, line))
        prose = re.sub(r"```.*?```", "", text, flags=re.S).replace("\n", " ")
        out += [(doc.name, re.sub(r"\s+", " ", m)) for m in re.findall(r"`(longctx [^`]+)`", prose)]
    return out


def _is_synopsis(line: str) -> bool:
    """A usage synopsis with placeholders (MODEL_DIR, [--flag], A | B, ...) rather than a command."""
    code = line.split("#")[0]
    return bool(re.search(r" \[|\.\.\.|\|| [A-Z][A-Z_]{2,}\b", code))


def test_the_docs_print_commands_in_blocks_and_prose():
    found = printed_commands()
    assert len({d for d, _ in found}) >= 8 and len(found) >= 80


@pytest.mark.parametrize("line", sorted({l for _, l in printed_commands() if not _is_synopsis(l)}))
def test_printed_command_parses_and_its_overrides_check(line):
    """argparse exits 2 on an unknown subcommand or flag; overrides go through the command's own checks."""
    from longctx.cli import build_parser
    argv = shlex.split(line, comments=True)[1:]
    if all(not w.startswith("-") and "=" not in w and "/" not in w for w in argv) and len(argv) <= 2:
        return _names_a_command(argv)  # prose naming a command (`longctx claims`), not a command line
    args = build_parser().parse_args(argv)
    assert callable(getattr(args, "func", None)), line
    overrides = getattr(args, "overrides", None) or []
    if any(o.startswith("init_from=") for o in overrides):
        return  # the saved model sets its limits: test_docs_commands runs it after making that model
    if args.command == "pretrain":
        from longctx.train.config import load_yaml, resolve
        resolve(load_yaml(ROOT / args.config) if args.config else {}, overrides)
    elif args.command == "compare":
        from longctx.experiments.compare import load_comparison
        load_comparison(ROOT / args.config if args.config else None, overrides)
    elif args.command == "finetune" and not args.init_from:
        from longctx.io import load_yaml
        from longctx.train.finetune import finetune_config
        finetune_config(args.task, load_yaml(ROOT / args.config) if args.config else {}, overrides, None)


def _names_a_command(words: list[str]) -> None:
    from longctx.cli import build_parser
    parser = build_parser()
    for word in words:
        sub = next((a for a in parser._actions if a.choices and not a.option_strings), None)
        assert sub is not None and word in sub.choices, f"longctx {' '.join(words)}: {word!r} is not a command"
        if not isinstance(sub.choices, dict):  # `claims table`: a positional's choice, the last word
            break
        parser = sub.choices[word]


def test_synopses_name_real_subcommands():
    from longctx.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for _, line in printed_commands():
        words = [w for w in line.split()[1:] if not w.startswith("-")]  # `longctx --explain-attention COMMAND`
        assert words[0] in sub.choices or words[0] == "COMMAND", line
