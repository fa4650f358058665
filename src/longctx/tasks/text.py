"""Byte-level text classification (Long Range Arena's "Text", Tay et al. 2020): classification read
byte by byte (no tokenizer: UTF-8 bytes are the tokens, so documents are several times longer than in
subwords), trained from scratch. Same data format, head and metrics as ``classification``. Built-in
data: the section task of ``classification`` at the byte level (LRA uses IMDB, which is not on the
machine).
"""
from __future__ import annotations

from longctx.data.tokenizer import ByteTokenizer
from longctx.tasks.base import register
from longctx.tasks.classification import ClassificationTask


@register
class TextTask(ClassificationTask):
    name = "text"
    from_scratch = True
    OPTIONS = {**ClassificationTask.OPTIONS, "context_chars": 2000}
    CONFIG = {"data": {"seq_len": 2048}, "model": {"max_position_embeddings": 4096},
              "train": {"steps": 200, "batch_size": 4, "lr": 1e-3, "warmup_steps": 20, "eval_batches": 1}}

    def make_tokenizer(self):
        return ByteTokenizer()
