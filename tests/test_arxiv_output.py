"""Two runs of `longctx corpus arxiv` into one folder: a second writer is refused while the first holds
the folder's lock, and a run into a finished corpus that would drop its documents is refused unless
--append or --overwrite says which is meant."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from longctx.cli import main as cli_main
from longctx.corpora.cli import build_arxiv_corpus
from longctx.errors import LongctxError
from test_arxiv_faults import _papers


def _ids(out):
    return [json.loads(line)["id"] for line in open(out / "structured.jsonl")]


def _outputs(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".lock"}


# The first writer, in its own process: its converter waits for the test to say go, so the run holds the
# folder's lock while the second one tries.
FIRST = textwrap.dedent("""
    import os, sys, time
    from longctx.corpora.arxiv import convert_source
    from longctx.corpora.cli import build_arxiv_corpus
    inp, out, flag = sys.argv[1:4]

    def slow(path, limits):
        open(flag + ".started", "w").close()
        while not os.path.exists(flag + ".go"):
            time.sleep(0.05)
        return convert_source(path, limits)

    build_arxiv_corpus([inp], out, workers=1, progress=False, converter=slow)
""")


def test_a_second_writer_is_refused_while_the_first_holds_the_folder(tmp_path, capsys):
    first_in, second_in = _papers(tmp_path / "first", ["a", "b"]), _papers(tmp_path / "second", ["x", "y"])
    out, flag = tmp_path / "out", tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", FIRST, str(first_in), str(out), str(flag)],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "flag.started").exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the first writer never started converting"
            time.sleep(0.05)
        with pytest.raises(LongctxError, match=rf"{out} is being written by another run \(process {proc.pid}\)"):
            build_arxiv_corpus([str(second_in)], str(out), progress=False)
        assert cli_main(["corpus", "arxiv", str(second_in), "--out", str(out), "--overwrite", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert "being written by another run" in err and len(err.strip().splitlines()) == 1, err
    finally:
        (tmp_path / "flag.go").touch()
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert _ids(out) == ["a", "b"]  # the first run's documents, whole
    assert json.load(open(out / "stats.json"))["documents_kept"] == 2


def test_a_run_into_a_finished_corpus_of_other_inputs(tmp_path, capsys):
    first_in, second_in = _papers(tmp_path / "first", ["a", "b"]), _papers(tmp_path / "second", ["x", "y"])
    out = tmp_path / "out"
    run = lambda inp, *flags: cli_main(["corpus", "arxiv", str(inp), "--out", str(out), "--workers", "1",  # noqa: E731
                                        "--quiet", *flags])
    assert run(first_in) == 0 and _ids(out) == ["a", "b"]
    before = _outputs(out)

    assert run(second_in) == 2  # would drop a and b
    err = capsys.readouterr().err
    assert f"{out} holds a finished corpus of 2 inputs, 2 of which this run does not give (e.g. a.tex); add " \
           "--append" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1, err
    assert _outputs(out) == before

    _papers(first_in, ["c"])  # the same folder again, grown: the documented rerun, no flag needed
    assert run(first_in) == 0 and _ids(out) == ["a", "b", "c"]

    assert run(second_in, "--append") == 0 and _ids(out) == ["a", "b", "c", "x", "y"]
    assert json.load(open(out / "stats.json"))["inputs_seen"] == 5
    assert run(first_in) == 2  # would drop x and y
    capsys.readouterr()

    assert run(second_in, "--overwrite") == 0 and _ids(out) == ["x", "y"]
    assert json.load(open(out / "stats.json"))["inputs_seen"] == 2
