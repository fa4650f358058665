"""Faults while building an arXiv corpus: dying workers, memory-hungry papers, broken archives,
verbatim text that looks like the end of the paper, bad flags and a full disk."""
from __future__ import annotations

import errno
import gzip
import json
import os
import signal

import pytest

from longctx.cli import main as cli_main
from longctx.corpora import cli as corpus_cli
from longctx.corpora.arxiv import Limits, convert_source
from longctx.corpora.cli import build_arxiv_corpus
from longctx.corpora.latex import convert

PAPER = r"""\documentclass{article}
\title{A Small Paper}
\begin{document}
\maketitle
\section{Introduction}
Plain words about %s.
\end{document}
"""


@pytest.fixture()
def no_hang():
    """Fail (instead of hanging CI forever) if the run under test does not finish in two minutes."""
    def boom(signum, frame):
        raise TimeoutError("the corpus build hung")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _papers(folder, names):
    folder.mkdir(exist_ok=True)
    for n in names:
        (folder / f"{n}.tex").write_text(PAPER % n)
    return folder


def _rejects(out):
    return {r["input"]: r for r in map(json.loads, open(out / "rejects.jsonl"))}


def _sigkill_on_doomed(path, limits):
    """The converter of a paper that gets its worker killed (as the OOM killer would)."""
    if "doomed" in os.path.basename(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return convert_source(path, limits)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_worker_rejects_its_paper_and_the_run_goes_on(tmp_path, workers, no_hang):
    inp = _papers(tmp_path / "in", ["a", "b", "doomed", "c", "d"])
    out = tmp_path / "out"
    stats = build_arxiv_corpus([str(inp)], str(out), workers=workers, progress=False,
                               converter=_sigkill_on_doomed)
    rejects = _rejects(out)
    assert set(rejects) == {"doomed.tex"}
    assert rejects["doomed.tex"]["reason"] == "worker-died" and "SIGKILL" in rejects["doomed.tex"]["detail"]
    ids = [json.loads(line)["id"] for line in open(out / "structured.jsonl")]
    assert ids == ["a", "b", "c", "d"]  # every other paper converted, in input order
    assert stats["rejects_by_reason"] == {"worker-died": 1}


def _allocating(path, limits):
    """A converter that needs as many MiB as the file name says (``alloc-300.tex``), then converts."""
    name = os.path.basename(path)
    if name.startswith("alloc-"):
        block = bytearray(int(name.split("-")[1].split(".")[0]) * 2**20)  # zero-filled: really allocated
        del block
    return convert_source(path, limits)


def test_memory_is_capped_per_paper_and_a_fresh_worker_takes_the_next(tmp_path, no_hang):
    inp = _papers(tmp_path / "in", ["alloc-40", "alloc-600", "alloc-50", "plain"])
    out = tmp_path / "out"
    limits = Limits(max_memory_bytes=200 * 2**20)
    stats = build_arxiv_corpus([str(inp)], str(out), workers=1, progress=False, limits=limits,
                               converter=_allocating)
    rejects = _rejects(out)
    # 600 MiB is over the 200 MiB cap: refused by the address-space limit, not by the OOM killer;
    # 40 and 50 MiB fit, before and after it
    assert {k: r["reason"] for k, r in rejects.items()} == {"alloc-600.tex": "out-of-memory"}
    assert stats["documents_kept"] == 3


def test_a_latex_bomb_of_backslashes_is_rejected_before_parsing(tmp_path, no_hang):
    # the file: 4 MB of `\x` in a paper, gzipped to about 4 KB; parsing it took 1.67 GB
    body = PAPER.replace("Plain words about %s.", "\\x" * 2_000_000)
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "bomb.gz").write_bytes(gzip.compress(body.encode(), 9))
    assert (inp / "bomb.gz").stat().st_size < 10_000
    (inp / "fine.tex").write_text(PAPER % "fine")
    out = tmp_path / "out"
    stats = build_arxiv_corpus([str(inp)], str(out), workers=1, progress=False)  # default limits
    rejects = _rejects(out)
    assert rejects["bomb.gz"]["reason"] == "too-large" and "MiB" in rejects["bomb.gz"]["detail"]
    assert stats["documents_kept"] == 1
    # with room for it, the same paper converts (the estimate is an upper bound, not a ban)
    doc = convert({"m.tex": PAPER.replace("Plain words about %s.", "\\x" * 20_000)}, "m.tex",
                  max_memory=Limits().max_memory_bytes)
    assert doc.structure and doc.title == "A Small Paper"


def test_verbatim_end_document_does_not_truncate_the_paper():
    src = (r"\documentclass{article}\begin{document}" "\n\\section{Usage}\nWrite this:\n"
           "\\begin{verbatim}\n\\end{document}\n\\end{verbatim}\n"
           "and \\verb|\\end{document}| too.\n\\section{After}\nThe rest of the paper.\n\\end{document}\n"
           "\\section{Ignored} after the real end.\n")
    doc = convert({"m.tex": src}, "m.tex")
    heads = [doc.text[s["start"]:s["end"]] for s in doc.structure]
    assert heads == ["Usage", "After"]
    assert "The rest of the paper." in doc.text and "Ignored" not in doc.text


def test_archives_that_are_not_what_their_name_says_are_corrupt(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "plain.tar.gz").write_bytes(b"this is an HTML error page, not a gzip file\n" * 20)
    (inp / "plain.tgz").write_bytes(b"<html>403</html>\n" * 40)
    (inp / "plain.tar").write_bytes(b"hello\n" * 200)
    (inp / "text.gz").write_bytes(b"\\documentclass{article}" * 40)
    (inp / "ok.tex").write_text(PAPER % "ok")
    out = tmp_path / "out"
    build_arxiv_corpus([str(inp)], str(out), progress=False)
    assert {k: r["reason"] for k, r in _rejects(out).items()} == {
        "plain.tar.gz": "corrupt-archive", "plain.tgz": "corrupt-archive", "plain.tar": "corrupt-archive",
        "text.gz": "corrupt-archive"}


@pytest.mark.parametrize("flag,value", [("--timeout", "-5"), ("--timeout", "nan"), ("--max-memory-mb", "0"),
                                        ("--max-mb", "-1"), ("--max-members", "0")])
def test_bad_numeric_flags_are_one_sentence(tmp_path, capsys, flag, value):
    inp = _papers(tmp_path / "in", ["a"])
    assert cli_main(["corpus", "arxiv", str(inp), "--out", str(tmp_path / "o"), flag, value]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_output_path_errors_are_one_sentence(tmp_path, capsys):
    inp = _papers(tmp_path / "in", ["a"])
    (tmp_path / "file").write_text("x")
    assert cli_main(["corpus", "arxiv", str(inp), "--out", str(tmp_path / "file" / "sub")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "output folder" in err


def test_a_full_disk_is_one_sentence_and_keeps_the_previous_corpus(tmp_path, capsys, monkeypatch):
    inp = _papers(tmp_path / "in", ["a", "b"])
    out = tmp_path / "out"
    assert cli_main(["corpus", "arxiv", str(inp), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _papers(inp, ["c"])

    def enospc(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(corpus_cli.os, "fsync", enospc)
    assert cli_main(["corpus", "arxiv", str(inp), "--out", str(out), "--workers", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before  # the previous outputs, whole, and no temporary files left beside them

    monkeypatch.undo()  # space again: the rerun finishes from the journal
    assert cli_main(["corpus", "arxiv", str(inp), "--out", str(out), "--workers", "1", "--quiet"]) == 0
    ids = [json.loads(line)["id"] for line in open(out / "structured.jsonl")]
    assert ids == ["a", "b", "c"]
