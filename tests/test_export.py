"""Export of encoders: torch.export (.pt2) and ONNX run in onnxruntime, against the PyTorch model itself.

Every check runs the exported graph at lengths (and batch sizes) other than the export example's, with
padding, so a graph that had frozen the example's shape or ignored the mask would fail.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import longctx  # noqa: F401
from longctx.cli import main
from longctx.errors import LongctxError
from longctx.export import example_inputs, export_onnx, export_spec
from longctx.models import (LongctxConfig, LongctxForCausalLM, LongctxForMaskedLM, LongctxForQuestionAnswering,
                            LongctxForSequenceClassification)

SEP = 3


def _model(cls, **kw):
    torch.manual_seed(0)
    cfg = LongctxConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, attention="sliding", window=8, max_position_embeddings=256,
                        sep_token_id=SEP, **kw)
    return cls(cfg).eval()


def _inputs(batch: int, n: int):
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(4, 100, (batch, n), generator=g)
    ids[:, 9] = SEP  # a 9-token question (with <cls>) for the QA preset
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[-1, n - 5:] = 0  # right padding in the last row
    return ids, mask


def _expected(model, ids, mask, names):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return [getattr(out, k).numpy() for k in names]


# two lengths and batch sizes that were not the export example's (2 x 67)
OTHER_SHAPES = [(1, 30), (3, 101)]


@pytest.mark.slow
def test_onnx_runs_in_onnxruntime_like_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model(LongctxForMaskedLM)
    spec = export_spec(model)
    assert example_inputs(spec)[0].shape == (2, 67)
    path = export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path))
    for batch, n in OTHER_SHAPES:
        ids, mask = _inputs(batch, n)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        for g, want in zip(got, _expected(model, ids, mask, spec.output_names)):
            assert g.shape == want.shape
            assert np.abs(g - want).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("cls", [LongctxForSequenceClassification, LongctxForQuestionAnswering])
def test_pt2_through_the_cli_equals_pytorch(cls, tmp_path):
    model = _model(cls, num_labels=3) if cls is LongctxForSequenceClassification else _model(cls)
    model.save_pretrained(tmp_path / "model")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "m.pt2"), "--max-global", "12"]) == 0
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    names = export_spec(model).output_names
    for batch, n in OTHER_SHAPES:
        ids, mask = _inputs(batch, n)
        got = program(ids, mask)
        for g, want in zip(got, _expected(model, ids, mask, names)):
            assert np.abs(g.detach().numpy() - want).max() < 1e-4


def _question(n: int, question: int):
    """Two rows of n tokens: <cls>, a question of ``question`` tokens (5 at most in the first row), <sep>,
    context; the second row right-padded."""
    g = torch.Generator().manual_seed(n + question)
    ids = torch.randint(4, 100, (2, n), generator=g)
    ids[0, min(question, 5) + 1] = SEP
    ids[1, question + 1] = SEP
    mask = torch.ones(2, n, dtype=torch.long)
    mask[1, max(question + 2, n - 5):] = 0
    return ids, mask


@pytest.mark.slow
@pytest.mark.parametrize("max_global", [None, 201])
def test_exported_qa_equals_pytorch_for_every_question_length(max_global, tmp_path):
    """QA exported by default (slots for <cls> and the 64 question tokens finetuning keeps) equals PyTorch
    for questions of up to 64 tokens and for inputs shorter than its slots; a longer question's row gets
    NaN logits, never other numbers. With 201 slots it equals PyTorch up to 200 question tokens."""
    ort = pytest.importorskip("onnxruntime")
    model = _model(LongctxForQuestionAnswering)
    slots = export_spec(model, max_global).max_global
    assert slots == (max_global or 65)
    session = ort.InferenceSession(str(export_onnx(model, tmp_path / "qa.onnx", max_global=max_global)))
    for question, n in [(1, 3), (1, 20), (8, 12), (30, 50), (64, 70), (64, 200), (65, 90), (70, 120), (200, 240)]:
        ids, mask = _question(n, question)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        for g, want in zip(got, _expected(model, ids, mask, ("start_logits", "end_logits"))):
            assert np.abs(g[0] - want[0]).max() < 1e-4
            if 1 + question <= slots:
                assert np.abs(g[1] - want[1]).max() < 1e-4
            else:  # more global tokens than slots: refused in the only way a graph can, NaN
                assert np.isnan(g[1]).all()


def test_clear_errors(tmp_path, capsys):
    decoder = _model(LongctxForCausalLM, causal=True)
    decoder.save_pretrained(tmp_path / "dec")
    capsys.readouterr()  # the save's progress bar
    assert main(["export", str(tmp_path / "dec"), str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err
    assert "cannot be exported" in err and "Traceback" not in err and err.count("\n") == 1
    with pytest.raises(LongctxError, match="cannot be exported"):  # the check on a model in memory
        export_spec(decoder)

    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "m.onnx")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    enc = _model(LongctxForMaskedLM)
    enc.save_pretrained(tmp_path / "enc")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "enc"), str(tmp_path / "no" / "m.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
