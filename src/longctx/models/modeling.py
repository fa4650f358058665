"""longctx models: a bidirectional encoder with masked-LM, classification and QA heads, and a causal
decoder with a language-model head and generation. All are Hugging Face ``PreTrainedModel``s.

Global attention (Longformer): every model takes ``global_attention_mask`` (B, n), one boolean per token.
Presets: classification makes the first token global, QA the question tokens (all tokens before the
first ``sep_token_id``), unless a mask is given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    MultipleChoiceModelOutput,
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MaskedLMOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
)

from longctx.attention.layer import LayerCache, SelfAttention
from longctx.dropout import Dropout
from longctx.errors import LongctxError
from longctx.loss import cross_entropy
from longctx.models.config import LongctxConfig
from longctx.positions import ALiBi, AbsoluteTable, PositionEncoding, alibi_slopes, sinusoidal_table

# the outputs' key-value cache field: ``cache`` since transformers renamed ``past_key_values``, whose old name
# makes every process print a deprecation warning (once, at the first forward)
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class Embeddings(nn.Module):
    """Token embeddings plus absolute positions (the position encoding's ``embed``; nothing for
    encodings that act inside attention)."""

    def __init__(self, config: LongctxConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        if config.position in ("learned", "sinusoidal"):
            # named as in BERT, so the learned table's weight is `embeddings.position_embeddings.weight`
            self.position_embeddings = AbsoluteTable(config.position, config.max_position_embeddings,
                                                     config.hidden_size, config.position_offset)
        else:
            self.position_embeddings = PositionEncoding()
        # post-norm models (BERT) normalise the embeddings; pre-norm models (GPT-2) do not
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm == "post" else nn.Identity()
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.position_embeddings.embed(self.word_embeddings(input_ids), positions)
        return self.dropout(self.norm(x))


class Block(GradientCheckpointingLayer):
    """Attention and feed-forward, each with a residual connection; norms before (pre) or after (post)."""

    def __init__(self, config: LongctxConfig, layer_idx: int):
        super().__init__()
        self.pre = config.norm == "pre"
        name, fields, causal = config.layer_attention()[layer_idx]
        self.attention = SelfAttention(
            config.hidden_size, config.num_attention_heads, dict(fields, type=name),
            position=config.position, global_projections=config.global_projections,
            dropout=config.hidden_dropout_prob, rope_base=config.rope_base,
            xpos_scale_base=config.xpos_scale_base, backend=config.attention_backend, causal=causal,
            max_len=config.max_position_embeddings, layer_idx=layer_idx, seed=config.attention_seed)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.output = nn.Linear(config.intermediate_size, config.hidden_size)
        self.output_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, x, key_padding_mask=None, global_mask=None, positions=None, cache=None,
                output_attentions: bool = False):
        """(B, n, hidden) -> (B, n, hidden); with ``output_attentions``, (that, probabilities (B, H, n, n))."""
        def ffn(h):
            return self.dropout(self.output(self.act(self.intermediate(h))))

        def attend(h):
            out = self.attention(h, key_padding_mask, global_mask, positions, cache, output_attentions)
            return out if output_attentions else (out, None)

        if self.pre:
            a, probs = attend(self.attention_norm(x))
            x = x + a
            x = x + ffn(self.output_norm(x))
        else:
            a, probs = attend(x)
            x = self.attention_norm(x + a)
            x = self.output_norm(x + ffn(x))
        return (x, probs) if output_attentions else x


class LongctxPreTrainedModel(PreTrainedModel):
    config_class = LongctxConfig
    config: LongctxConfig
    base_model_prefix = "longctx"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, AbsoluteTable):
            if module.kind == "learned":
                module.weight.normal_(0.0, std)
            else:  # a fixed table, not in the weights file: from_pretrained hands it over uninitialised
                module.weight.copy_(sinusoidal_table(*module.weight.shape).to(module.weight))
        elif isinstance(module, ALiBi):  # likewise the slopes (non-persistent buffer)
            module.slopes.copy_(alibi_slopes(module.slopes.shape[0]).to(module.slopes))
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()


def _bool_mask(mask):
    return None if mask is None else mask.to(torch.bool)


class LongctxModel(LongctxPreTrainedModel):
    """The stack of blocks: an encoder, or a decoder when ``config.causal``."""

    def __init__(self, config: LongctxConfig):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList([Block(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.norm == "pre" else nn.Identity()
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, position_ids=None,
                past_key_values: list[LayerCache] | None = None, use_cache: bool = False,
                output_attentions: bool = False, **kwargs):
        """input_ids (B, n). attention_mask (B, n): 1 for real tokens, 0 for padding.
        global_attention_mask (B, n): 1 for global tokens. position_ids (n,) or (B, n), one row per
        sequence: defaults to 0..n-1 counted over the real tokens of each row (a left-padded row starts
        at 0 at its first real token, as Hugging Face's RoBERTa and Longformer number them), or to the
        positions after the cache when decoding with ``past_key_values``. With ``output_attentions``
        (Hugging Face's flag), ``attentions`` holds one (B, H, n, n) probability matrix per layer (what
        ``longctx analyze`` reads; computed only when asked)."""
        B, n = input_ids.shape
        if n == 0:
            raise LongctxError("input_ids is empty: give at least one token")
        kpm = _bool_mask(attention_mask)
        tracing = torch.compiler.is_compiling()  # no branch on tensor values in a traced graph
        if kpm is not None and not tracing and bool(kpm.all()):
            kpm = None
        gm = _bool_mask(global_attention_mask)
        if gm is not None and not tracing and not bool(gm.any()):
            gm = None
        if use_cache and not self.config.causal:
            raise LongctxError("use_cache needs a causal (decoder) model")
        if use_cache and past_key_values is None:
            past_key_values = [LayerCache() for _ in self.layers]
        if past_key_values is not None and (kpm is not None or gm is not None):
            raise LongctxError("decoding with a key-value cache takes unpadded inputs without global tokens")
        position_ids = self._positions(input_ids, attention_mask, position_ids, past_key_values)
        x = self.embeddings(input_ids, position_ids)
        attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layers):
            cache = None if past_key_values is None else past_key_values[i]
            if output_attentions:
                x, probs = layer(x, kpm, gm, position_ids, cache, output_attentions=True)
                attentions.append(probs)
            else:
                x = layer(x, kpm, gm, position_ids, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.final_norm(x),
                                       **{CACHE_FIELD: past_key_values if use_cache else None},
                                       attentions=None if attentions is None else tuple(attentions))

    @staticmethod
    def _positions(input_ids, attention_mask, position_ids, past_key_values):
        """(n,) when every row has the same positions, else (B, n), one row per sequence."""
        B, n = input_ids.shape
        tracing = torch.compiler.is_compiling()  # no branch on tensor values in a traced graph
        if position_ids is None:
            if past_key_values:
                start = 0 if len(past_key_values[0]) == 0 else int(past_key_values[0].pos[-1]) + 1
                return torch.arange(start, start + n, device=input_ids.device)
            if attention_mask is None or (not tracing and bool(attention_mask.bool().all())):
                return torch.arange(n, device=input_ids.device)
            # positions follow the attention mask: real tokens count 0, 1, ...; padding gets 0
            real = attention_mask.bool()
            position_ids = (real.long().cumsum(-1) - 1).clamp(min=0) * real
        if position_ids.dim() == 1:
            return position_ids
        if tuple(position_ids.shape) != (B, n):
            raise LongctxError(f"position_ids has shape {tuple(position_ids.shape)}; give (n,) or "
                               f"(batch, n) = ({B}, {n})")
        if tracing:
            return position_ids
        if bool((position_ids == position_ids[:1]).all()):
            return position_ids[0]
        if past_key_values is not None:
            raise LongctxError("decoding with a key-value cache takes one row of position_ids for the batch")
        return position_ids


class LMHead(nn.Module):
    """dense -> activation -> norm -> vocabulary projection (tied to the input embeddings)."""

    def __init__(self, config: LongctxConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, h):
        return self.decoder(self.norm(self.act(self.dense(h))))


class LongctxForMaskedLM(LongctxPreTrainedModel):
    _tied_weights_keys = {"lm_head.decoder.weight": "longctx.embeddings.word_embeddings.weight"}

    def __init__(self, config: LongctxConfig):
        super().__init__(config)
        self.longctx = LongctxModel(config)
        self.lm_head = LMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head.decoder

    def set_output_embeddings(self, new):
        self.lm_head.decoder = new

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, position_ids=None,
                labels=None, output_attentions: bool = False, **kwargs):
        """With ``labels`` (-100 = not predicted), the head runs on the labelled positions only (the
        vocabulary projection is most of an MLM step's FLOPs at small sizes) and ``logits`` holds just
        those rows, in order; without labels, logits for every position."""
        base = self.longctx(input_ids, attention_mask, global_attention_mask, position_ids,
                            output_attentions=output_attentions)
        h = base.last_hidden_state
        if labels is None:
            return MaskedLMOutput(logits=self.lm_head(h), attentions=base.attentions)
        sel = labels != -100
        logits = self.lm_head(h[sel])
        loss = cross_entropy(logits, labels[sel]) if logits.shape[0] else logits.sum() * 0.0
        return MaskedLMOutput(loss=loss, logits=logits, attentions=base.attentions)


class LongctxForSequenceClassification(LongctxPreTrainedModel):
    """Classification from the first token, which is global unless a global mask is given."""

    def __init__(self, config: LongctxConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.longctx = LongctxModel(config)
        drop = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, position_ids=None,
                labels=None, output_attentions: bool = False, **kwargs):
        if global_attention_mask is None:
            global_attention_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            global_attention_mask[:, 0] = True
        base = self.longctx(input_ids, attention_mask, global_attention_mask, position_ids,
                            output_attentions=output_attentions)
        h = base.last_hidden_state
        logits = self.classifier(self.dropout(torch.tanh(self.dense(self.dropout(h[:, 0])))))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif labels.dtype in (torch.long, torch.int):
                loss = F.cross_entropy(logits.float(), labels)
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        return SequenceClassifierOutput(loss=loss, logits=logits, attentions=base.attentions)


class LongctxForMultipleChoice(LongctxPreTrainedModel):
    """Multiple choice (QuALITY-style): ``input_ids`` (batch, options, n), one sequence per option; each is
    scored from its first token and the options' scores are a softmax (cross-entropy over the options).
    ``option_mask`` (batch, options) marks real options where a batch pads their number (padding scores
    -inf). Global tokens: ``global_attention_mask`` (batch, options, n); none given: the first token."""

    def __init__(self, config: LongctxConfig):
        super().__init__(config)
        self.longctx = LongctxModel(config)
        drop = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, position_ids=None,
                labels=None, option_mask=None, output_attentions: bool = False, **kwargs):
        if input_ids.dim() != 3:
            raise LongctxError(f"multiple choice takes input_ids of shape (batch, options, length), got {tuple(input_ids.shape)}")
        b, c, n = input_ids.shape
        flat = lambda t: None if t is None else t.reshape(b * c, *t.shape[2:])  # noqa: E731
        if global_attention_mask is None:
            global_attention_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            global_attention_mask[..., 0] = True
        base = self.longctx(flat(input_ids), flat(attention_mask), flat(global_attention_mask), flat(position_ids),
                            output_attentions=output_attentions)
        h = base.last_hidden_state[:, 0]
        logits = self.classifier(self.dropout(torch.tanh(self.dense(self.dropout(h))))).view(b, c).float()
        if option_mask is not None:
            logits = logits.masked_fill(~option_mask.bool(), float("-inf"))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return MultipleChoiceModelOutput(loss=loss, logits=logits, attentions=base.attentions)


def question_global_mask(input_ids: torch.Tensor, sep_token_id: int | None) -> torch.Tensor:
    """Longformer's QA preset: every token before the first separator (the question, with <cls>) is global.
    The one definition of QA's global tokens: finetuning, evaluation, ``model(...)`` and export use it."""
    if sep_token_id is None:
        raise LongctxError("QA needs config.sep_token_id to find the question, or an explicit global_attention_mask")
    is_sep = input_ids == sep_token_id
    if not torch.compiler.is_compiling() and not bool(is_sep.any(-1).all()):  # checked eagerly only
        raise LongctxError(f"every QA input needs a separator token (id {sep_token_id}) after the question")
    end = is_sep.int().argmax(-1)
    return torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] < end[:, None]


class LongctxForQuestionAnswering(LongctxPreTrainedModel):
    """Extractive QA: start and end logits per token; question tokens are global by default."""

    def __init__(self, config: LongctxConfig):
        super().__init__(config)
        self.longctx = LongctxModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, global_attention_mask=None, position_ids=None,
                start_positions=None, end_positions=None, output_attentions: bool = False, **kwargs):
        if global_attention_mask is None:
            global_attention_mask = question_global_mask(input_ids, self.config.sep_token_id)
        base = self.longctx(input_ids, attention_mask, global_attention_mask, position_ids,
                            output_attentions=output_attentions)
        h = base.last_hidden_state
        start, end = self.qa_outputs(h).float().unbind(-1)
        loss = None
        if start_positions is not None and end_positions is not None:
            n = input_ids.shape[1]
            loss = (F.cross_entropy(start, start_positions.clamp(0, n), ignore_index=n)
                    + F.cross_entropy(end, end_positions.clamp(0, n), ignore_index=n)) / 2
        return QuestionAnsweringModelOutput(loss=loss, start_logits=start, end_logits=end,
                                            attentions=base.attentions)


class LongctxForCausalLM(LongctxPreTrainedModel):
    """Decoder with a language-model head. ``generate`` decodes greedily or by sampling with a key-value
    cache that keeps only what each layer's pattern can still reach (bounded for sliding-window and
    blockwise-causal layers)."""

    _tied_weights_keys = {"lm_head.weight": "longctx.embeddings.word_embeddings.weight"}

    def __init__(self, config: LongctxConfig):
        if not config.causal:
            raise LongctxError("LongctxForCausalLM needs a causal config (causal: true)")
        super().__init__(config)
        self.longctx = LongctxModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new):
        self.lm_head = new

    def forward(self, input_ids, attention_mask=None, position_ids=None, labels=None, past_key_values=None,
                use_cache=False, global_attention_mask=None, output_attentions: bool = False, **kwargs):
        out = self.longctx(input_ids, attention_mask, global_attention_mask, position_ids,
                           past_key_values=past_key_values, use_cache=use_cache, output_attentions=output_attentions)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: getattr(out, CACHE_FIELD)},
                                      attentions=out.attentions)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, eos_token_id: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Extend ``input_ids`` (B, n) by up to ``max_new_tokens`` tokens; returns (B, n + new)."""
        def pick(logits):
            if not do_sample:
                return logits.argmax(-1)
            logits = logits.float() / max(temperature, 1e-6)
            if top_k:
                kth = logits.topk(top_k, -1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)

        was_training = self.training
        self.eval()
        seq, cache, step_input = input_ids, None, input_ids
        for _ in range(max_new_tokens):
            if use_cache:
                out = self(step_input, past_key_values=cache, use_cache=True)
                cache = getattr(out, CACHE_FIELD)
            else:
                out = self(seq)
            nxt = pick(out.logits[:, -1])
            seq = torch.cat([seq, nxt[:, None]], 1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        self.train(was_training)
        return seq
