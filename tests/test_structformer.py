"""StructFormer end to end: arXiv LaTeX -> structure-aware corpus -> heading tokens global -> pretraining."""
import gzip
import io
import json
import tarfile

import torch

from longctx.data.collate import MLMCollator
from longctx.corpora.cli import build_arxiv_corpus
from longctx.data.packing import PackedDataset, prepare_data
from longctx.train.config import resolve
from longctx.train.loop import pretrain

SECTIONS = ["Introduction", "Related Work", "Sliding Windows", "Global Tokens", "Experiments", "Conclusion"]


def _paper(i: int) -> str:
    body = "\n".join(
        f"\\section{{{s}}}\n" + " ".join(f"Sentence {j} of part {s.lower()} in paper {i} about long documents."
                                         for j in range(25)) + "\n% a comment that must vanish\n"
        for s in SECTIONS)
    return (f"\\documentclass{{article}}\n\\title{{Paper {i} on Attention}}\n\\begin{{document}}\n\\maketitle\n"
            f"\\begin{{abstract}}We study paper {i}.\\end{{abstract}}\n{body}\n"
            "\\begin{equation}x^2\\end{equation}\n\\end{document}\n")


def test_corpus_to_global_headings_to_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGCTX_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        tex = _paper(i).encode()
        if i % 2:
            (src / f"{i:04d}.gz").write_bytes(gzip.compress(tex))
        else:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tf:
                info = tarfile.TarInfo("main.tex")
                info.size = len(tex)
                tf.addfile(info, io.BytesIO(tex))
            (src / f"{i:04d}.tar.gz").write_bytes(buf.getvalue())
    out = tmp_path / "corpus"
    stats = build_arxiv_corpus([str(src)], str(out), progress=False)
    assert stats["documents_kept"] == 12 and stats["rejected"] == 0

    structured = out / "structured.jsonl"
    data = prepare_data(str(structured), "bytes", 0.2, 0, cache_dir=tmp_path / "cache")
    twin = prepare_data(str(out / "text.jsonl"), "bytes", 0.2, 0, cache_dir=tmp_path / "cache")
    # the text-only twin is the same token stream, without the heading flags
    assert torch.equal(torch.from_numpy(data.train.ids.astype("int64")), torch.from_numpy(twin.train.ids.astype("int64")))
    assert data.train.heading.any() and not twin.train.heading.any()

    ds = PackedDataset(data.train, 256)
    batch = MLMCollator(data.tokenizer, global_tokens="headings", seed=0)([ds[i] for i in range(len(ds))], batch_index=0)
    glob = batch["global_attention_mask"]
    ids = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    global_text = data.tokenizer.decode(ids[glob].tolist())
    for s in SECTIONS:
        assert s in global_text  # every heading's tokens are global ...
    assert "Sentence" not in global_text  # ... and body text is not
    assert 0 < glob.float().mean() < 0.1

    cfg = resolve({"data": {"corpus": str(structured), "tokenizer": "bytes", "seq_len": 256, "valid_fraction": 0.2,
                            "global_tokens": "headings"},
                   "model": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "window": 16,
                             "max_position_embeddings": 256},
                   "train": {"steps": 4, "batch_size": 2, "save_every": 0, "log_every": 2, "eval_batches": 2}})
    result = pretrain(cfg, tmp_path / "run", progress=False)
    assert result["steps"] == 4 and result["eval"]["loss"] > 0
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["global_projections"] is True


def test_heading_global_takes_auto_true_or_false():
    """StructFormer's 2 x 2 sets task.heading_global per variant: auto, true and false are accepted
    (false once failed as "expects str"), anything else is one sentence."""
    import pytest

    from longctx.errors import LongctxError
    from longctx.tasks.common import task_options
    from longctx.train.finetune import task_class

    cls = task_class("section_heading")
    for v in ("auto", True, False):
        assert task_options(cls, {"heading_global": v})["heading_global"] == v
    with pytest.raises(LongctxError, match="'task.heading_global' expects str or bool, got 3"):
        task_options(cls, {"heading_global": 3})
    t = cls.__new__(cls)
    t.opts, t.cfg = {"heading_global": "maybe"}, {}
    with pytest.raises(LongctxError, match="auto, true or false"):
        t.headings_global()
    t.opts = {"heading_global": False}
    assert t.headings_global() is False
