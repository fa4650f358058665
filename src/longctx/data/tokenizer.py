"""Tokenizers behind one small interface: bytes, any Hugging Face ``tokenizer.json``, or trained here.

Interface (both ``ByteTokenizer`` and ``HFTokenizer``)::

    tok.vocab_size, tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id, tok.bos_id, tok.eos_id
    tok.special_ids                      # frozenset: never masked, never a random replacement
    ids, offsets = tok.encode(text)      # no special tokens added; offsets = (start, end) characters
    tok.encode_batch(texts)              # list of (ids, offsets)
    tok.decode(ids)                      # special tokens dropped
    tok.save(folder, max_length=None)    # tokenizer.json + tokenizer_config.json + special_tokens_map.json
    tok.fingerprint()                    # sha256 of what defines the ids: a cache key

``load_tokenizer(spec, documents=None)`` with ``spec``:

- ``"bytes"``: ``ByteTokenizer``: ids 0-255 are the UTF-8 bytes, then ``<pad>`` 256, ``<mask>`` 257,
  ``<bos>`` 258, ``<eos>`` 259 (also the separator), ``<cls>`` 260; for character-level LM
  (Longformer's text8/enwik8) and bits per character. Every multi-byte character's bytes carry that
  character's offsets.
- a path to a ``tokenizer.json`` or a folder holding one (e.g. a Hugging Face model folder; the
  special tokens are read from its ``tokenizer_config.json`` / ``special_tokens_map.json`` or
  recognised by name: ``[PAD] <pad>``, ``[MASK] <mask>``, ``[CLS] <s>``, ``[SEP] </s>``, ...);
- ``{"train": "bpe" | "wordpiece", "vocab_size": N, "min_frequency": 2}`` with ``documents``: train
  on the documents' text with the ``tokenizers`` library (byte-level BPE as RoBERTa, or WordPiece as
  BERT). Pass ``cache_dir`` to keep the result keyed by corpus + spec, so a rerun reuses it
  (``prepare_data`` does). Byte-level BPE training is deterministic; the ``tokenizers`` WordPiece
  trainer breaks ties between equally frequent merges in hash order, so two WordPiece trainings on
  the same corpus can differ in a few marginal tokens: reuse the cached/saved folder (with ``cache_dir``
  every caller gets the cached one, also a process that trained at the same time as another).

``save`` writes files that ``transformers.AutoTokenizer.from_pretrained(folder)`` loads (as a
``PreTrainedTokenizerFast``; its default ``add_special_tokens=True`` adds ``cls ... sep``) and that
``load_tokenizer(folder)`` loads back as the same class. A saved ``ByteTokenizer`` is an equivalent
byte-level model in ``tokenizer.json`` plus ``"longctx_tokenizer": "bytes"`` in the config.

Text that spells a special token (say ``"[MASK]"``) is encoded as ordinary text by ``encode``, so a
corpus cannot smuggle special ids into training data.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import (Tokenizer, decoders, models, pre_tokenizers, processors, normalizers, trainers,
                        Tokenizer as _Tok)

from longctx.data.corpus import corpus_fingerprint
from longctx.errors import LongctxError
from longctx.io import publish_dir, write_text

_ROLE_NAMES = {  # recognised special-token spellings, most specific first
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "mask": ("[MASK]", "<mask>", "<|mask|>"),
    "cls": ("[CLS]", "<cls>", "<s>", "<bos>", "<|begin_of_text|>", "<|endoftext|>"),
    "sep": ("[SEP]", "<sep>", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
    "bos": ("<s>", "<bos>", "[CLS]", "<cls>", "<|begin_of_text|>", "<|endoftext|>"),
    "eos": ("</s>", "<eos>", "[SEP]", "<sep>", "<|end_of_text|>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>", "<|unk|>"),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus five special tokens; pure numpy, no vocabulary file."""

    specials = ("<pad>", "<mask>", "<bos>", "<eos>", "<cls>")
    pad_id, mask_id, bos_id, eos_id, cls_id = 256, 257, 258, 259, 260
    sep_id = eos_id
    unk_id = None
    vocab_size = 261
    special_ids = frozenset(range(256, 261))

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = self.encode_arrays(text)
        return ids.tolist(), [tuple(o) for o in offsets.tolist()]

    def encode_arrays(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """``(ids int64 [n], offsets int64 [n, 2])``: the fast path used for packing."""
        data = text.encode("utf-8", "surrogatepass")
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int64)
        cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        lens = 1 + (cps >= 0x80).astype(np.int64) + (cps >= 0x800) + (cps >= 0x10000)
        starts = np.repeat(np.arange(len(cps), dtype=np.int64), lens)
        return ids, np.stack([starts, starts + 1], axis=1)

    def encode_batch(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        return hashlib.sha256(b"longctx-bytes-v1").hexdigest()

    def hf_tokenizer(self):
        """An equivalent ``tokenizers.Tokenizer`` (byte-level model, ids 0-255 = bytes) for saving."""

        b2u = _bytes_to_unicode()
        tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(self.specials))
        tok.post_processor = processors.TemplateProcessing(
            single="<cls> $A <eos>", pair="<cls> $A <eos> $B:1 <eos>:1",
            special_tokens=[("<cls>", self.cls_id), ("<eos>", self.eos_id)])
        return tok

    def save(self, folder: str | Path, max_length: int | None = None) -> None:
        """The tokenizer files; ``max_length``: the positions of the model saved with it (see ``_save_hf``)."""
        roles = {"pad": "<pad>", "mask": "<mask>", "bos": "<bos>", "eos": "<eos>", "cls": "<cls>", "sep": "<eos>"}
        _save_hf(self.hf_tokenizer(), roles, folder, extra={"longctx_tokenizer": "bytes"}, max_length=max_length)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=261)"


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` (from a ``tokenizer.json`` or trained) with its special-token roles."""

    def __init__(self, tokenizer, roles: dict[str, str] | None = None):
        tokenizer = tokenizer.__class__.from_str(tokenizer.to_str())  # own copy: settings below are ours
        tokenizer.no_truncation()  # model folders often ship max_length 128/512 truncation
        tokenizer.no_padding()
        self._tok = tokenizer
        self._enc = tokenizer.__class__.from_str(tokenizer.to_str())
        self._enc.encode_special_tokens = True  # "[MASK]" in a document is text, not the mask token
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        roles = dict(roles or {})
        for role, names in _ROLE_NAMES.items():
            if role not in roles:
                roles[role] = next((n for n in names if n in vocab), None)
        self.roles = {r: n for r, n in roles.items() if n is not None and n in vocab}
        ids = {r: vocab[n] for r, n in self.roles.items()}
        self.pad_id = ids.get("pad", ids.get("eos", ids.get("sep")))
        self.mask_id = ids.get("mask")
        self.cls_id = ids.get("cls", ids.get("bos"))
        self.sep_id = ids.get("sep", ids.get("eos"))
        self.bos_id = ids.get("bos", self.cls_id)
        self.eos_id = ids.get("eos", self.sep_id)
        self.unk_id = ids.get("unk")
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset({i for i, t in added.items() if t.special} | {i for i in ids.values()})
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer`` (with special tokens recognised, as saved)."""
        return self._tok

    def encode(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        e = self._enc.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def encode_batch(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        return [(e.ids, e.offsets) for e in self._enc.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def fingerprint(self) -> str:
        return hashlib.sha256((self._tok.to_str() + json.dumps(self.roles, sort_keys=True)).encode()).hexdigest()

    def save(self, folder: str | Path, max_length: int | None = None) -> None:
        """The tokenizer files; ``max_length``: the positions of the model saved with it (see ``_save_hf``)."""
        _save_hf(self._tok, self.roles, folder, max_length=max_length)

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, roles={self.roles})"


NO_MAX_LENGTH = 1_000_000_000  # model_max_length of a tokenizer saved without a model (the cache): no limit


def _save_hf(tok, roles: dict[str, str], folder: str | Path, extra: dict | None = None,
             max_length: int | None = None) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` atomically.
    ``model_max_length`` is ``max_length``: the positions of the model the tokenizer is saved with (so that
    Hugging Face's truncation warnings and ``truncation=True`` use the model's real limit); without a model,
    no limit."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir(exist_ok=True)
    special_map = {f"{r}_token": n for r, n in roles.items() if r in ("pad", "mask", "cls", "sep", "bos", "eos", "unk")}
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(max_length or NO_MAX_LENGTH),
              "clean_up_tokenization_spaces": False, "added_tokens_decoder": added, **special_map, **(extra or {})}
    files = {"tokenizer.json": tok.to_str(pretty=True), "tokenizer_config.json": json.dumps(config, indent=2),
             "special_tokens_map.json": json.dumps(special_map, indent=2)}
    for name, content in files.items():
        write_text(folder / name, content)


def _roles_from_config(folder: Path) -> dict[str, str]:
    roles: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
        p = folder / name
        if not p.exists():
            continue
        try:
            cfg = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LongctxError(f"tokenizer file {p} is not valid JSON; fix or remove it.") from None
        for role in _ROLE_NAMES:
            v = cfg.get(f"{role}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                roles[role] = v
    return roles


def train_tokenizer(documents: list[dict], kind: str = "bpe", vocab_size: int = 8192,
                    min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE (RoBERTa's specials ``<s> <pad> </s> <unk> <mask>``) or a WordPiece
    (BERT's ``[PAD] [UNK] [CLS] [SEP] [MASK]``, cased) tokenizer on the documents' text."""

    texts = [d["text"] for d in documents]
    if not texts:
        raise LongctxError("cannot train a tokenizer on an empty corpus; give documents with text.")
    if kind == "bpe":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        roles = {"cls": "<s>", "bos": "<s>", "pad": "<pad>", "sep": "</s>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
        cls, sep = "<s>", "</s>"
    elif kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                            special_tokens=specials, show_progress=False)
        roles = {"cls": "[CLS]", "bos": "[CLS]", "pad": "[PAD]", "sep": "[SEP]", "eos": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}
        cls, sep = "[CLS]", "[SEP]"
    else:
        raise LongctxError(f"tokenizer training kind '{kind}' is unknown; use 'bpe' or 'wordpiece'.")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return HFTokenizer(tok, roles)


def load_tokenizer(spec, documents: list[dict] | None = None, cache_dir: str | Path | None = None):
    """A tokenizer from ``"bytes"``, a ``tokenizer.json`` path or folder, or a training spec (see module doc)."""
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if isinstance(spec, dict):
        unknown = set(spec) - {"train", "vocab_size", "min_frequency"}
        if "train" not in spec or unknown:
            raise LongctxError(f"tokenizer spec {spec} is not understood; write e.g. "
                               f"{{train: bpe, vocab_size: 8192}} (keys: train, vocab_size, min_frequency).")
        if documents is None:
            raise LongctxError("a tokenizer to train needs the corpus documents; pass documents=... .")
        kind = str(spec["train"]).lower()
        size, minf = spec.get("vocab_size", 8192), spec.get("min_frequency", 2)
        for key, value, low in (("vocab_size", size, 1), ("min_frequency", minf, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise LongctxError(f"tokenizer {key} must be an integer of at least {low}, got {value!r}; write e.g. "
                                   f"{{train: bpe, vocab_size: 8192}}.")
        if cache_dir is None:
            return train_tokenizer(documents, kind, size, minf)

        key = hashlib.sha256(f"{corpus_fingerprint(documents)}|{kind}|{size}|{minf}|v1".encode()).hexdigest()[:20]
        folder = Path(cache_dir) / f"{kind}-{size}-{key}"
        if (folder / "tokenizer_config.json").exists():
            return load_tokenizer(folder)
        tok = train_tokenizer(documents, kind, size, minf)
        with publish_dir(folder, replace=False, prefix=".tok-") as tmp:  # kept if another process saved it first
            tok.save(tmp)
        # the cached one, whoever saved it: two processes that trained at once (a comparison's first runs)
        # must use the same tokenizer, and WordPiece training is not deterministic (module doc)
        return load_tokenizer(folder)
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(str(spec)).expanduser()
    if not path.exists():
        raise LongctxError(f"tokenizer {spec} does not exist; give 'bytes', a tokenizer.json file, a folder "
                           f"holding one, or {{train: bpe, vocab_size: N}}.")
    folder = path if path.is_dir() else path.parent
    file = path / "tokenizer.json" if path.is_dir() else path
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            if json.loads(cfg_path.read_text(encoding="utf-8")).get("longctx_tokenizer") == "bytes":
                return ByteTokenizer()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LongctxError(f"tokenizer file {cfg_path} is not valid JSON; fix or remove it.") from None
    if not file.exists():
        raise LongctxError(f"tokenizer folder {folder} has no tokenizer.json; give a folder saved by a fast "
                           f"Hugging Face tokenizer (save_pretrained) or by longctx.")

    try:
        tok = _Tok.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
        raise LongctxError(f"tokenizer {file} could not be read ({e}); give a valid tokenizer.json.") from None
    return HFTokenizer(tok, _roles_from_config(folder) if path.is_dir() or cfg_path.exists() else None)
