"""Hostile arXiv archives made here, resuming, and the command line's user errors."""
from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
import tarfile

import pytest

from longctx.cli import main as cli_main
from longctx.corpora.arxiv import Limits
from longctx.corpora.cli import build_arxiv_corpus
from longctx.errors import LongctxError

PAPER = r"""\documentclass{article}
\newcommand{\method}{StructFormer}
\title{Headings as Global Tokens in \method}
\begin{document}
\maketitle
\begin{abstract}
We study global attention on headings. % a comment that must vanish
\end{abstract}
\section{Introduction}
Long documents have structure~\cite{x}; see Section~\ref{s:m} and $x^2+y$.
\begin{figure}\centering\includegraphics{plot.pdf}\caption{A secret caption}\end{figure}
\input{body}
\end{document}
"""
BODY = r"""\section{Method}\label{s:m}
The \method{} model marks \emph{heading} tokens.
\begin{equation} E = mc^2 \end{equation}
\subsection{Details of the \textbf{mask}}
\begin{table}\begin{tabular}{cc} hidden & cell \end{tabular}\end{table}
Done.
"""


def _tar(members, gz=True) -> bytes:
    """members: (TarInfo fields..., data) tuples -> archive bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for spec in members:
            ti = tarfile.TarInfo(spec["name"])
            data = spec.get("data", b"")
            ti.type = spec.get("type", tarfile.REGTYPE)
            ti.linkname = spec.get("linkname", "")
            ti.size = len(data) if ti.type == tarfile.REGTYPE else 0
            if ti.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                ti.devmajor, ti.devminor = 1, 3
            tf.addfile(ti, io.BytesIO(data) if ti.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def _good_members():
    return [{"name": "main.tex", "data": PAPER.encode()}, {"name": "body.tex", "data": BODY.encode()}]


@pytest.fixture()
def hostile(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    good = _good_members()
    (inp / "good1.tar.gz").write_bytes(_tar(good))
    (inp / "good2.tex.gz").write_bytes(gzip.compress((PAPER.replace(r"\input{body}", BODY)).encode()))
    (inp / "good3.tar").write_bytes(_tar(good, gz=False))
    (inp / "traversal.tar.gz").write_bytes(_tar(good + [{"name": "../../evil.tex", "data": b"pwned"}]))
    (inp / "absolute.tar.gz").write_bytes(_tar(good + [{"name": "/tmp/evil_abs.tex", "data": b"pwned"}]))
    (inp / "symlink.tar.gz").write_bytes(_tar(good + [{"name": "link.tex", "type": tarfile.SYMTYPE,
                                                       "linkname": "/etc/passwd"}]))
    (inp / "hardlink.tar.gz").write_bytes(_tar(good + [{"name": "hard.tex", "type": tarfile.LNKTYPE,
                                                        "linkname": "main.tex"}]))
    (inp / "device.tar.gz").write_bytes(_tar(good + [{"name": "dev.tex", "type": tarfile.CHRTYPE}]))
    # a bomb: 3 MB of zeros compress to a few KB; the cap in the test is 1 MiB
    (inp / "bomb.tar.gz").write_bytes(_tar(good + [{"name": "zeros.tex", "data": b"\0" * 3_000_000}]))
    (inp / "bomb1.gz").write_bytes(gzip.compress(b"%" * 3_000_000))
    (inp / "latin1.tar.gz").write_bytes(_tar([{"name": "main.tex",
                                               "data": PAPER.replace("We study", "Caf\u00e9 study")
                                               .encode("latin-1")}, good[1]]))
    whole = _tar(good)
    (inp / "truncated.tar.gz").write_bytes(whole[: len(whole) // 2])
    (inp / "notgzip.tar.gz").write_bytes(b"\x1f\x8b" + os.urandom(200))
    (inp / "nomain.tar.gz").write_bytes(_tar([{"name": "body.tex", "data": BODY.encode()}]))
    return tmp_path, inp


EXPECTED_REJECTS = {
    "traversal.tar.gz": "path-traversal", "absolute.tar.gz": "absolute-path", "symlink.tar.gz": "symlink",
    "hardlink.tar.gz": "hardlink", "device.tar.gz": "special-file", "bomb.tar.gz": "too-large",
    "bomb1.gz": "too-large", "latin1.tar.gz": "not-utf8", "truncated.tar.gz": "corrupt-archive",
    "notgzip.tar.gz": "corrupt-archive", "nomain.tar.gz": "no-main-file",
}


def _snapshot(*dirs):
    seen = set()
    for d in dirs:
        for root, _, files in os.walk(d):
            seen.update(os.path.join(root, f) for f in files)
    return seen


@pytest.mark.parametrize("workers", [1, 2])
def test_hostile_archives_are_rejected_and_the_rest_converted(hostile, workers, monkeypatch, tmp_path_factory):
    base, inp = hostile
    out = base / "out"
    # the run's temporary folder is a private one, so other processes on the machine writing to /tmp
    # cannot disturb the check that nothing lands outside OUT
    private_tmp = tmp_path_factory.mktemp("private_tmp")
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)
    before = _snapshot(base, private_tmp)
    stats = build_arxiv_corpus([str(inp)], str(out), workers=workers, progress=False,
                               limits=Limits(max_bytes=2**20, max_text_bytes=2**20))
    after = _snapshot(base, private_tmp)
    new_outside = {p for p in after - before if not p.startswith(str(out) + os.sep)}
    assert new_outside == set()
    assert not os.path.exists("/tmp/evil_abs.tex") and not (base / "evil.tex").exists()

    rejects = {r["input"]: r["reason"] for r in map(json.loads, open(out / "rejects.jsonl"))}
    assert rejects == EXPECTED_REJECTS
    assert stats["rejects_by_reason"]["too-large"] == 2
    assert stats["documents_kept"] == 3 and stats["inputs_seen"] == 14

    recs = [json.loads(line) for line in open(out / "structured.jsonl")]
    assert [r["id"] for r in recs] == ["good1", "good2", "good3"]
    for r in recs:
        t = r["text"]
        spans = {(s["kind"], t[s["start"]:s["end"]]) for s in r["structure"]}
        assert spans == {("title", "Headings as Global Tokens in StructFormer"),
                         ("abstract", "We study global attention on headings."),
                         ("section", "Introduction"), ("section", "Method"),
                         ("subsection", "Details of the mask")}
        assert r["title"] == "Headings as Global Tokens in StructFormer"
        for gone in ("comment", "secret caption", "hidden", "mc^2", "\\", "plot.pdf"):
            assert gone not in t
        assert "[CITE]" in t and "[REF]" in t and "[MATH]" in t
        assert "The StructFormer model marks heading tokens." in t
    texts = [json.loads(line) for line in open(out / "text.jsonl")]
    assert texts == [{"id": r["id"], "text": r["text"]} for r in recs]


def test_latin1_fallback_parses_best_effort(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "p.tex").write_bytes(PAPER.replace("We study", "Caf\u00e9 study").replace(r"\input{body}", "")
                                .encode("latin-1"))
    stats = build_arxiv_corpus([str(inp / "p.tex")], str(tmp_path / "o"), progress=False,
                               limits=Limits(latin1_fallback=True))
    assert stats["documents_kept"] == 1
    rec = json.loads(open(tmp_path / "o" / "structured.jsonl").readline())
    assert "Caf\u00e9 study" in rec["text"]


def test_rerun_skips_done_inputs_and_gives_identical_files(hostile):
    base, inp = hostile
    out = base / "out"
    limits = Limits(max_bytes=2**20, max_text_bytes=2**20)
    first = build_arxiv_corpus([str(inp)], str(out), workers=2, progress=False, limits=limits)
    files = {n: (out / n).read_bytes() for n in ("structured.jsonl", "text.jsonl", "rejects.jsonl")}
    journal = (out / ".state" / "journal.jsonl").read_bytes()
    second = build_arxiv_corpus([str(inp)], str(out), workers=2, progress=False, limits=limits)
    assert first["run"]["processed"] == 14 and first["run"]["skipped"] == 0
    assert second["run"]["processed"] == 0 and second["run"]["skipped"] == 14
    assert {n: (out / n).read_bytes() for n in files} == files
    assert (out / ".state" / "journal.jsonl").read_bytes() == journal  # nothing reconverted
    first.pop("run"), second.pop("run")
    assert first == second

    # a new input is converted alone; an interrupted journal line is ignored and redone
    (inp / "good4.tar.gz").write_bytes(_tar(_good_members()))
    with open(out / ".state" / "journal.jsonl", "ab") as f:
        f.write(b'{"key": "half-writ')
    third = build_arxiv_corpus([str(inp)], str(out), workers=1, progress=False, limits=limits)
    assert third["run"]["processed"] == 1 and third["documents_kept"] == 4
    ids = [json.loads(line)["id"] for line in open(out / "structured.jsonl")]
    assert ids == ["good1", "good2", "good3", "good4"]


def test_unpacked_folder_and_plain_tex(tmp_path):
    paper = tmp_path / "in" / "paper1"
    paper.mkdir(parents=True)
    (paper / "main.tex").write_text(PAPER)
    (paper / "body.tex").write_text(BODY)
    (tmp_path / "in" / "single.tex").write_text(PAPER.replace(r"\input{body}", ""))
    stats = build_arxiv_corpus([str(tmp_path / "in")], str(tmp_path / "out"), progress=False)
    recs = [json.loads(line) for line in open(tmp_path / "out" / "structured.jsonl")]
    assert stats["documents_kept"] == 2 and [r["id"] for r in recs] == ["paper1", "single"]
    assert sum(s["kind"] == "section" for s in recs[0]["structure"]) == 2
    assert sum(s["kind"] == "section" for s in recs[1]["structure"]) == 1


def test_cycles_and_missing_inputs_do_not_stop_conversion(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    main = PAPER.replace(r"\input{body}", r"\input{a}\include{missing}")
    (inp / "p.tar.gz").write_bytes(_tar([{"name": "main.tex", "data": main.encode()},
                                         {"name": "a.tex", "data": b"\\section{A}\\input{b}"},
                                         {"name": "b.tex", "data": b"\\section{B}\\input{a.tex}"}]))
    stats = build_arxiv_corpus([str(inp)], str(tmp_path / "out"), progress=False)
    rec = json.loads(open(tmp_path / "out" / "structured.jsonl").readline())
    heads = [rec["text"][s["start"]:s["end"]] for s in rec["structure"] if s["kind"] == "section"]
    assert heads == ["Introduction", "A", "B"]
    # the paper is kept, and what it lacked is reported, not dropped
    assert stats["missing_inputs"] == {"papers": 1, "files": 1, "by_input": {"p.tar.gz": ["missing"]}}
    assert json.load(open(tmp_path / "out" / "stats.json"))["missing_inputs"] == stats["missing_inputs"]


def test_user_errors_are_one_sentence_and_exit_2(tmp_path, capsys):
    with pytest.raises(LongctxError, match="does not exist"):
        build_arxiv_corpus([str(tmp_path / "nope")], str(tmp_path / "out"))
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongctxError, match="is a file"):
        build_arxiv_corpus([str(tmp_path / "empty")], str(tmp_path / "file"))
    with pytest.raises(LongctxError, match="no arXiv sources"):
        build_arxiv_corpus([str(tmp_path / "empty")], str(tmp_path / "out"))

    assert cli_main(["corpus", "arxiv", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx corpus: error: input") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1

    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "p.tex").write_text(PAPER.replace(r"\input{body}", ""))
    assert cli_main(["corpus", "arxiv", str(inp), "--out", str(tmp_path / "o2"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "1 documents kept" in captured.out
    assert "docs/s" in captured.err and "ETA" in captured.err
