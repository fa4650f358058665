"""Export longctx encoders for inference: ``torch.export`` (.pt2) and ONNX, with a dynamic sequence length.

What is exported is the model's inference function ``(input_ids, attention_mask) -> outputs`` (masked-LM
logits; classification logits; QA start and end logits). Inside a traced graph the blocked kernel runs as
plain tensor ops (``blocked.traceable_band_attention``): memory stays O(n * w), and nothing branches on
tensor values, so one graph serves every length.

Global tokens are the one data-dependent part of the model: their number sizes the rows computed for
them. An exported graph reserves ``max_global`` slots instead (default: 1 for classification, whose preset
makes only the first token global; for QA, whose preset makes ``<cls>`` and the question global, the
``<cls>`` and the longest question finetuning keeps, ``task.max_question_tokens``). An input shorter than
the slots is padded inside the graph (its outputs are those of the unpadded input), and a QA row whose
question has more global tokens than the slots gets NaN logits: never a silently different answer
(export with a larger ``--max-global`` for longer questions). Decoders are not exported: generation needs a
key-value cache that grows between calls.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx.experimental._config as fx_config
from torch import nn

from longctx.errors import LongctxError
from longctx.models import (LongctxForQuestionAnswering, question_global_mask, LongctxForMaskedLM,
                            LongctxForSequenceClassification)
import longctx.attention.functional as functional
import longctx.models as models
from longctx.models.loading import load_longctx_model, read_longctx_config
from longctx.tasks.qa import QATask

FORMATS = ("onnx", "pt2")
# attention mechanisms whose traced form takes any length (the mask family)
EXPORTABLE_ATTENTION = ("full", "sliding", "blocks")

def default_max_global(name: str) -> int | None:
    """Global slots a model class's exported graph reserves unless told: classification's first token;
    QA's <cls> and the longest question finetuning keeps."""
    if name == "LongctxForQuestionAnswering":
        return 1 + QATask.OPTIONS["max_question_tokens"]
    return 1 if name == "LongctxForSequenceClassification" else None


@dataclass
class ExportSpec:
    """What the exported graph takes and returns."""
    output_names: tuple[str, ...]
    min_len: int  # shortest input the graph takes
    max_len: int  # longest (the position table's size)
    max_global: int | None  # global slots reserved (None: the head makes no token global)


class InferenceFunction(nn.Module):
    """``(input_ids (B, n), attention_mask (B, n)) -> tuple of outputs``: the model's inference call with
    plain tensors in and out, which is what torch.export and ONNX take. With ``max_global`` slots, every
    input is padded by that many tokens (the slots are a top-k over the positions, so a shorter input
    could not fill them) and a QA row with more global tokens than slots gets NaN logits."""

    def __init__(self, model: nn.Module, output_names: tuple[str, ...], max_global: int | None = None):
        super().__init__()
        self.model, self.output_names, self.max_global = model, output_names, max_global

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        n = input_ids.shape[1]
        if self.max_global is not None:  # max_global padding tokens (masked, at position 0): no output changes
            pad = input_ids.new_zeros(input_ids.shape[0], self.max_global)
            input_ids, attention_mask = torch.cat([input_ids, pad], 1), torch.cat([attention_mask, pad], 1)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        outputs = tuple(getattr(out, name) for name in self.output_names)
        if self.max_global is not None and isinstance(self.model, LongctxForQuestionAnswering):
            beyond = question_global_mask(input_ids, self.model.config.sep_token_id).sum(-1) > self.max_global
            outputs = tuple(o[:, :n].masked_fill(beyond[:, None], float("nan")) for o in outputs)
        return outputs


def export_spec(model: nn.Module, max_global: int | None = None) -> ExportSpec:
    """Check that ``model`` can be exported and say how; one sentence (LongctxError) if it cannot."""

    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, (LongctxForMaskedLM, LongctxForSequenceClassification,
                                                LongctxForQuestionAnswering)):
        what = "a decoder with a key-value cache" if "CausalLM" in name else f"a {name}"
        raise LongctxError(f"{what} cannot be exported; export a longctx encoder (masked LM, sequence "
                           "classification or question answering)")
    if getattr(config, "causal", False):
        raise LongctxError("a causal (decoder) model cannot be exported; generation needs a key-value cache "
                           "that grows between calls")
    for i, (kind, _fields, _causal) in enumerate(config.layer_attention()):
        if kind not in EXPORTABLE_ATTENTION:
            raise LongctxError(f"layer {i} uses {kind!r} attention, which cannot be exported with a dynamic "
                               f"length; export models with {', '.join(EXPORTABLE_ATTENTION)} attention")
    outputs = ("start_logits", "end_logits") if isinstance(model, LongctxForQuestionAnswering) else ("logits",)
    slots = max_global if max_global is not None else default_max_global(name)
    if slots is not None and slots < 1:
        raise LongctxError(f"--max-global must be at least 1, got {slots}")
    max_len = int(config.max_position_embeddings)
    if slots is not None and slots > max_len:
        raise LongctxError(f"--max-global {slots} exceeds the model's {max_len} positions")
    return ExportSpec(outputs, 2, max_len, slots)


@contextlib.contextmanager
def _tracing_settings(max_global: int | None):
    """Global slots for the traced graph, and sizes assumed > 1 while tracing (a length that is 1 during
    export must not make the graph special-case it)."""


    before = functional.traced_max_global
    functional.traced_max_global = max_global
    try:
        with fx_config.patch(backed_size_oblivious=True):
            yield
    finally:
        functional.traced_max_global = before


def example_inputs(spec: ExportSpec, length: int | None = None, batch: int = 2):
    """Random example (input_ids, attention_mask) for tracing; the length is not special to the graph."""
    n = length or min(spec.max_len, max(spec.max_global or 0, 64) + 3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (batch, n), generator=g)
    return ids, torch.ones(batch, n, dtype=torch.long)


def export_program(model: nn.Module, *, max_global: int | None = None, example_len: int | None = None):
    """``torch.export`` of the model's inference function, dynamic in the sequence length (batch fixed at
    the example's: 2). Returns (ExportedProgram, ExportSpec)."""
    spec = export_spec(model, max_global)
    fn = InferenceFunction(model.eval(), spec.output_names, spec.max_global)
    seq = torch.export.Dim("seq", min=spec.min_len, max=spec.max_len)
    batch = torch.export.Dim("batch", min=1, max=1024)
    args = example_inputs(spec, example_len)
    with _tracing_settings(spec.max_global), torch.no_grad():
        program = torch.export.export(fn, args, dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                                      strict=False)
    return program, spec


def export_onnx(model: nn.Module, path: str | Path, *, max_global: int | None = None,
                example_len: int | None = None) -> Path:
    """ONNX through ``torch.onnx.export(dynamo=True)`` of the exported program; inputs ``input_ids`` and
    ``attention_mask`` (int64, (batch, seq)), outputs named as the model's output fields."""
    try:  # torch.onnx's exporter imports it only once the program is traced: say so before that
        import onnxscript  # noqa: F401
    except ImportError:
        raise LongctxError("exporting to ONNX needs onnxscript, which is not installed: pip install "
                           "'longctx-toolkit[export]' (in a clone: pip install -e '.[export]')") from None
    program, spec = export_program(model, max_global=max_global, example_len=example_len)
    path = Path(path)
    with _tracing_settings(spec.max_global):
        onnx_program = torch.onnx.export(program, input_names=["input_ids", "attention_mask"],
                                         output_names=list(spec.output_names), dynamo=True, verbose=False)
    tmp = path.with_name(path.name + ".tmp")
    onnx_program.save(str(tmp))  # weights inside the file; renamed only once complete
    tmp.replace(path)
    return path


def export_pt2(model: nn.Module, path: str | Path, *, max_global: int | None = None,
               example_len: int | None = None) -> Path:
    """``torch.export.save`` of the exported program (load with ``torch.export.load``)."""
    program, _spec = export_program(model, max_global=max_global, example_len=example_len)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.export.save(program, str(tmp))
    tmp.replace(path)
    return path


def load_for_export(model_dir: str | Path) -> nn.Module:
    """The longctx model in ``model_dir`` as the class its config names (one sentence if it cannot be)."""

    config = read_longctx_config(model_dir)
    archs = config.get("architectures") or ["LongctxForMaskedLM"]
    cls = getattr(models, archs[0], None)
    if cls is None:
        raise LongctxError(f"{model_dir}: architecture {archs[0]!r} is not a longctx model class")
    if config.get("causal") or "CausalLM" in archs[0]:  # refused before the weights are read
        raise LongctxError(f"{model_dir} is a decoder; a decoder with a key-value cache cannot be exported "
                           "(export a masked LM, sequence classification or question answering encoder)")
    return load_longctx_model(model_dir, cls)


def export_model(model_dir: str | Path, out: str | Path, fmt: str = "onnx", *,
                 max_global: int | None = None) -> Path:
    """Load ``model_dir`` and write it to ``out`` as ``fmt`` ("onnx" or "pt2")."""
    if fmt not in FORMATS:
        raise LongctxError(f"export format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise LongctxError(f"{out} is a folder; give the file to write, e.g. {out / ('model.' + fmt)}")
    if not out.parent.exists():
        raise LongctxError(f"folder {out.parent} does not exist; create it first")
    model = load_for_export(model_dir)
    write = export_onnx if fmt == "onnx" else export_pt2
    return write(model, out, max_global=max_global)
