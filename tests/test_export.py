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
from longctx.export import example_inputs, export_onnx, export_program, export_spec
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


@pytest.mark.parametrize("cls,max_global", [(LongctxForMaskedLM, None), (LongctxForQuestionAnswering, 12)])
def test_onnx_runs_in_onnxruntime_like_pytorch(cls, max_global, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model(cls)
    spec = export_spec(model, max_global)
    assert example_inputs(spec)[0].shape == (2, 67)
    path = export_onnx(model, tmp_path / "m.onnx", max_global=max_global)
    session = ort.InferenceSession(str(path))
    for batch, n in OTHER_SHAPES:
        ids, mask = _inputs(batch, n)
        got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        for g, want in zip(got, _expected(model, ids, mask, spec.output_names)):
            assert g.shape == want.shape
            assert np.abs(g - want).max() < 1e-4


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


def test_global_tokens_beyond_the_reserved_slots_differ():
    """The slots are a real bound: with fewer slots than the question's tokens, the exported QA model
    (correctly) no longer equals the eager one, so the equality above is not vacuous."""
    model = _model(LongctxForQuestionAnswering)
    program, _spec = export_program(model, max_global=2)
    ids, mask = _inputs(1, 40)
    start = program.module()(ids, mask)[0].detach().numpy()
    assert np.abs(start - _expected(model, ids, mask, ["start_logits"])[0]).max() > 1e-4


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
