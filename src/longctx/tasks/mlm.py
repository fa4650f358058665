"""Masked language modelling (RoBERTa's dynamic masking) on a packed corpus: the pretraining task.

Also the base of every language-modelling task (``LanguageModelTask``): the corpus is split by document,
packed into ``seq_len``-token blocks per phase, and judged by the mean held-out loss per predicted
token and its perplexity, on fixed masks (evaluation batches draw theirs far from any training batch).
"""
from __future__ import annotations

import math

import torch

from longctx.data.collate import EVAL_BATCH_OFFSET  # noqa: F401  (re-exported)
from longctx.data.collate import batch_order, MLMCollator
from longctx.data.packing import prepare_data, PackedDataset
from longctx.errors import LongctxError
from longctx.loss import cross_entropy
from longctx.models import LongctxForMaskedLM
from longctx.tasks.base import Task, data_seed, register, stage_list
from longctx.tasks.metrics import bootstrap_ci


def lm_loss(model, dataset, collator, batches: int, batch_size: int, device=None, allow_empty: bool = False,
            causal: bool = False) -> dict:
    """Mean held-out loss over the first ``batches`` batches of ``dataset`` (fixed masks), its perplexity
    and the number of tokens it was computed on. No tokens at all is an error (a loss of 0 from
    nothing would read as a perfect model), or, with ``allow_empty``, ``loss: None``."""
    was_training = model.training
    model.eval()
    sums, counts = [], []  # per held-out sequence: summed token loss and predicted tokens
    n = min(batches, max(1, len(dataset) // batch_size))
    with torch.no_grad():
        for i in range(n):
            idx = batch_order(len(dataset), batch_size, i, 0, shuffle=False)
            batch = collator([dataset[j] for j in idx], batch_index=EVAL_BATCH_OFFSET + i)
            if device is not None:
                batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            # the model averages over the tokens it predicts: a causal model predicts from position 1 on
            predicted = labels[:, 1:] != -100 if causal else labels != -100
            if not bool(predicted.any()):
                continue
            s, c = _row_losses(model(**batch).logits, labels, predicted, causal)
            sums.append(s)
            counts.append(c)
    model.train(was_training)
    count = int(sum(int(c.sum()) for c in counts))
    if count == 0:
        if allow_empty:
            return {"loss": None, "perplexity": None, "eval_tokens": 0}
        raise LongctxError(f"no held-out tokens were evaluated ({n} batch(es) of {batch_size} held no predicted "
                           "token); use more train.eval_batches or a larger held-out part of the corpus")
    s, c = torch.cat(sums).double().numpy(), torch.cat(counts).double().numpy()
    keep = c > 0
    s, c = s[keep], c[keep]
    loss = float(s.sum() / c.sum())
    # 95% bootstrap interval over held-out sequences (a ratio of sums: tokens weigh as in the mean)
    ci = bootstrap_ci(lambda ix: float(s[ix].sum() / c[ix].sum()), len(s))
    # per held-out sequence: its summed loss over the mean count, so that their plain mean is the token-weighted
    # loss and two runs scored on the same sequences give a paired difference per sequence (longctx.stats)
    return {"loss": loss, "loss_ci": ci, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count,
            "eval_sequences": int(len(s)), "per_example": (s / c.mean()).tolist()}


def _row_losses(logits, labels, predicted, causal: bool):
    """Summed cross-entropy and predicted-token count of each row of a batch. The masked LM's logits
    hold the labelled positions only, row by row in order; the causal LM's predict position t + 1."""
    B = labels.shape[0]
    if causal:
        tok = cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none").view(B, -1)
        return (tok * predicted).sum(1), predicted.sum(1)
    tok = cross_entropy(logits, labels[predicted], reduction="none")
    rows = predicted.nonzero()[:, 0]
    return torch.zeros(B, dtype=tok.dtype, device=tok.device).index_add_(0, rows, tok), predicted.sum(1)


class LanguageModelTask(Task):
    """A language-modelling objective on the experiment's corpus (``cfg['data']``)."""

    causal = False

    def prepare(self) -> None:
        d = self.cfg["data"]
        self.data = prepare_data(d["corpus"], d["tokenizer"], d["valid_fraction"], data_seed(self.cfg), d["text_field"])
        self.tokenizer = self.data.tokenizer
        for n in [d["seq_len"]] + [s["seq_len"] for s in stage_list(self.cfg)]:
            if len(self.data.train) < n or len(self.data.valid) < n:
                raise LongctxError(
                    f"the corpus is too small for data.seq_len={n}: {len(self.data.train):,} training and "
                    f"{len(self.data.valid):,} held-out tokens; use a bigger corpus or a shorter sequence")
        self.collator = self.make_collator()

    def make_collator(self):
        raise NotImplementedError

    def _packed(self, stream, seq_len: int):
        start_token = self.tokenizer.cls_id if self.cfg["data"]["global_tokens"] == "first" else None
        return PackedDataset(stream, seq_len, start_token=start_token)

    def train_examples(self, seq_len: int):
        return self._packed(self.data.train, seq_len)

    def eval_examples(self, split: str, seq_len: int):
        if split not in ("dev", "test"):
            raise LongctxError(f"a language-modelling task has one held-out split, not {split!r}")
        return self._packed(self.data.valid, seq_len)

    def collate(self, examples, batch_index: int, rank: int = 0) -> dict:
        return self.collator(examples, batch_index=batch_index, rank=rank)

    def evaluate(self, model, split: str = "dev", *, seq_len: int | None = None, batches: int | None = None,
                 batch_size: int | None = None, device=None, allow_empty: bool = False) -> dict:
        t = self.cfg["train"]
        seq_len = seq_len or self.cfg["data"]["seq_len"]
        ev = lm_loss(model, self.eval_examples(split, seq_len), self.collator, batches or t["eval_batches"],
                     batch_size or t["batch_size"], device, allow_empty, self.causal)
        if self.causal and ev["loss"] is not None:  # bits per character of the held-out text
            tokens_per_char = len(self.data.valid) / max(1, self.data.valid_chars)
            ev["bits_per_char"] = ev["loss"] * tokens_per_char / math.log(2)
        return ev


@register
class MaskedLMTask(LanguageModelTask):
    name = "mlm"

    @property
    def model_class(self):
        return LongctxForMaskedLM

    @property
    def global_tokens(self):
        return self.cfg["data"]["global_tokens"]

    def make_collator(self):
        d = self.cfg["data"]
        return MLMCollator(self.tokenizer, d["mlm_probability"], d["global_tokens"], self.cfg["seed"],
                           eval_seed=data_seed(self.cfg))
