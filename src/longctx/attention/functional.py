"""``attention()``: one call for every pattern and kernel.

Backends (all compute the same function; the tests hold each to the dense reference). Which kernel runs
is the dispatcher's choice (``dispatch.py``: one priority list per backend, and every kernel's reasons
for not taking a call; ``longctx attention-backends`` prints them):
- "dense":   the reference (n x n mask), for tests and tiny inputs;
- "blocked": the band kernel, the CPU path for training and inference: the fused C++ kernel of
             ``fused.py`` where it takes the call (fp32/bf16 on CPU, eager, the extension built or
             buildable under ``LONGCTX_FUSED``), else the pure-PyTorch kernel of ``blocked.py``;
- "fused":   the fused C++ kernel, or an error if it cannot be built (inputs it does not take run on
             the pure-PyTorch kernel);
- "blocked-torch": the pure-PyTorch band kernel, always;
- "sdpa":    PyTorch's scaled_dot_product_attention, the fast path for the "full" pattern;
- "flex":    FlexAttention with the pattern's predicate as ``mask_mod`` (CUDA; CPU forward only);
- "auto":    flex on CUDA, sdpa for "full", blocked otherwise.
A general score bias (not ALiBi) runs on the dense reference whatever the backend.

Global tokens (Longformer) are handled the same way by every fast backend: each query attends to the
global keys on top of its local band, and the rows of global queries, which attend to every key, are
computed separately as a (G x n) product and written over the band's output. With separate global
projections (``global_qkv``) those rows use qg . kg over vg, as in Hugging Face's
``LongformerSelfAttention``.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from longctx.attention import dispatch
from longctx.attention import fused as fused_kernel
from longctx.attention.blocked import band_attention, dilation_permutation
from longctx.attention.patterns import AttentionPattern, compose
from longctx.attention.reference import alibi_bias, dense_attention, masked_softmax
from longctx.errors import LongctxError

BACKENDS = dispatch.REQUESTS
BAND_BACKENDS = dispatch.BAND_KERNELS


def resolve_backend(backend: str, q: torch.Tensor, pattern: AttentionPattern, **call) -> str:
    """The kernel ``attention(q, ..., pattern, backend=backend, **call)`` runs: the dispatcher's choice
    (``dispatch.py``), one of "dense", "sdpa", "flex", "fused", "blocked-torch"."""
    return dispatch.choose(dispatch.mask_call(backend, q, pattern, **call))


def attention(q, k, v, pattern: AttentionPattern, *, key_padding_mask=None, global_mask=None,
              global_qkv=None, alibi_slopes=None, scale=None, backend: str = "auto", chunk=None,
              score_bias=None, mechanism: str | None = None):
    """Attention of q over k, v under ``pattern``. q: (B, H, n, d); k, v: (B, H, n, d), or (B, Hkv, n, d)
    with Hkv dividing H (grouped-query attention: query head h attends key head h // (H / Hkv)); returns
    (B, H, n, d). The fused kernel reads the shared key heads as they are (no copy, and autograd keeps only
    them); every other kernel gets them repeated.

    key_padding_mask (B, n) bool: True for real tokens. global_mask (B, n) bool: True for global tokens.
    global_qkv: optional (qg, kg, vg) from separate global projections. alibi_slopes (H,): ALiBi bias.
    score_bias: a general bias callable ``bias(q_pos, k_pos) -> (H, tq, tk)`` (only the dense reference
    takes one, whatever ``backend`` says). scale defaults to 1/sqrt(d). Any length works; the output has
    the input's length. The kernel is the dispatcher's choice for ``backend`` (``dispatch.py``);
    ``mechanism`` names the calling mechanism in its explanation.
    """
    check_inputs(q, k, v, key_padding_mask, global_mask, global_qkv, alibi_slopes)
    B, H, n, d = q.shape
    backend = resolve_backend(backend, q, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                              alibi_slopes=alibi_slopes, score_bias=score_bias, mechanism=mechanism)
    groups = H // k.shape[1] if k.shape[1] else 1
    if groups > 1 and not (backend == "fused" and global_mask is None and global_qkv is None
                           and len(set(pattern.head_dilations(H))) == 1):
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if key_padding_mask is not None:  # padded keys contribute nothing, whatever their values (NaN too)
        k, v = drop_padded(k, key_padding_mask), drop_padded(v, key_padding_mask)
        if global_qkv is not None:
            global_qkv = (global_qkv[0], drop_padded(global_qkv[1], key_padding_mask),
                          drop_padded(global_qkv[2], key_padding_mask))
    if backend == "dense":
        return dense_attention(q, k, v, pattern, key_padding_mask=key_padding_mask, global_mask=global_mask,
                               global_qkv=global_qkv, alibi_slopes=alibi_slopes, scale=scale,
                               score_bias=score_bias)
    scale = d ** -0.5 if scale is None else scale
    if global_mask is not None:
        global_mask = global_mask.bool()
        if not torch.compiler.is_compiling() and not bool(global_mask.any()):  # a traced graph may not branch
            global_mask = None
    if global_mask is None:
        global_qkv = None
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.bool()

    if backend == "flex":
        out = _flex(q * scale, k, v, pattern, key_padding_mask, global_mask, alibi_slopes)
    elif backend == "sdpa":
        out = _sdpa(q * scale, k, v, pattern, key_padding_mask, alibi_slopes)
    else:
        out = _blocked(q, k, v, pattern, key_padding_mask, global_mask, alibi_slopes, chunk,
                       fused=backend == "fused", scale=scale)

    needs_rows = global_mask is not None and (backend in BAND_BACKENDS or global_qkv is not None)
    if needs_rows:
        qg, kg, vg = global_qkv if global_qkv is not None else (q, k, v)
        out = _global_rows(out, qg, kg, vg, pattern, key_padding_mask, global_mask, alibi_slopes, scale)
    return out


def check_inputs(q, k, v, key_padding_mask=None, global_mask=None, global_qkv=None, alibi_slopes=None) -> None:
    """One sentence for inputs the kernels cannot take (checked once, at the public entry)."""
    def shape(t):
        return tuple(t.shape)

    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise LongctxError("attention: q, k and v must be tensors")
    if (q.dim() != 4 or k.dim() != 4 or shape(v) != shape(k) or shape(k)[::2] != shape(q)[::2]
            or shape(k)[3] != shape(q)[3]
            or not (k.shape[1] == q.shape[1] or 0 < k.shape[1] < q.shape[1] and q.shape[1] % k.shape[1] == 0)):
        raise LongctxError(f"attention: q, k and v must have one shape (batch, heads, n, head_dim), except that k "
                           f"and v may have fewer heads dividing q's (grouped-query); got q {shape(q)}, k {shape(k)}, "
                           f"v {shape(v)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise LongctxError(f"attention: q, k and v must share one floating dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    tensors = [q, k, v] + [t for t in (key_padding_mask, global_mask, alibi_slopes) if t is not None] + \
        list(global_qkv or ())
    if any(t.device != q.device for t in tensors) or q.is_meta:
        raise LongctxError(f"attention: every input must be on one device with data; got "
                           f"{sorted({str(t.device) for t in tensors})}")
    B, H, n, _ = q.shape
    for name, m in (("key_padding_mask", key_padding_mask), ("global_mask", global_mask)):
        if m is not None and shape(m) != (B, n):
            raise LongctxError(f"attention: {name} must be (batch, n) = ({B}, {n}), got {shape(m)}")
    if global_qkv is not None and (len(global_qkv) != 3 or any(shape(t) != shape(q) for t in global_qkv)):
        raise LongctxError(f"attention: global_qkv must be three tensors shaped like q {shape(q)}")
    if alibi_slopes is not None and shape(alibi_slopes) != (H,):
        raise LongctxError(f"attention: alibi_slopes must be one per head ({H},), got {shape(alibi_slopes)}")


def empty_batch(q, k, v) -> torch.Tensor:
    """The result (0, H, n, d_v) of attention over an empty batch, joined to q, k and v's graphs so that
    backward gives their (empty) gradients: every tensor is empty, so no arithmetic happens."""
    return v + (q.sum() + k.sum()).to(v.dtype)


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, n, d) -> (B, Hkv * groups, n, d): each key head repeated for its group of query heads."""
    if groups == 1:
        return x
    B, Hkv, n, d = x.shape
    return x[:, :, None].expand(B, Hkv, groups, n, d).reshape(B, Hkv * groups, n, d)


def drop_padded(x: torch.Tensor, key_padding_mask: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, d) with the rows of padding tokens set to zero: padding is never attended, and a
    zero (unlike a NaN or inf the caller left there) times a zero weight stays zero."""
    return x.masked_fill(~key_padding_mask.bool()[:, None, :, None], 0.0)


def attention_at(q, k, v, q_pos, k_pos, pattern: AttentionPattern, *, key_valid=None, alibi_slopes=None,
                 scale=None):
    """Dense attention of queries at positions q_pos (t,) over keys at k_pos (m,): the decoding step with
    a key-value cache, where t is small and m is bounded by the pattern. key_valid (B, m) bool."""
    B, H, t, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    qp, kp = q_pos.view(1, t, 1), k_pos.view(1, 1, -1)
    mask = compose(pattern.local_allowed(qp, kp, pattern.head_params(H, q.device)).unsqueeze(0), qp, kp,
                   causal=pattern.causal, key_valid=None if key_valid is None else key_valid[:, None, None, :])
    scores = (q * scale) @ k.transpose(-1, -2)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, q_pos, k_pos).unsqueeze(0).to(scores.dtype)
    return masked_softmax(scores, mask) @ v


# Global slots a traced graph reserves (set by ``longctx.export``): an exported graph cannot size them by
# the data, so it takes the first ``traced_max_global`` global tokens of each row (None: size by the data).
traced_max_global: int | None = None


def global_index(global_mask: torch.Tensor):
    """Positions of the global tokens per batch row, padded to the largest count: (idx, valid), (B, G)."""
    counts = global_mask.sum(-1)
    if traced_max_global is not None and torch.compiler.is_compiling():
        n, G = global_mask.shape[-1], traced_max_global  # the exported length is at least G
        # globals first, each group in position order: a top-k with no ties (ONNX has TopK, not stable sort)
        pos = torch.arange(n, device=global_mask.device)
        order = torch.topk(global_mask.long() * (2 * n) + (n - pos), G, dim=-1).indices
        return order, torch.arange(G, device=global_mask.device)[None, :] < counts[:, None]
    G = int(counts.max())
    order = torch.argsort((~global_mask).to(torch.int8), dim=-1, stable=True)[:, :G]
    valid = torch.arange(G, device=global_mask.device)[None, :] < counts[:, None]
    return order, valid


def _gather_seq(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, d), idx (B, G) -> (B, H, G, d)."""
    B, H, _, d = x.shape
    return torch.gather(x, 2, idx[:, None, :, None].expand(B, H, idx.shape[1], d))


def _blocked(q, k, v, pattern, key_padding_mask, global_mask, alibi_slopes, chunk, fused: bool = False,
             scale: float = 1.0):
    """The band kernel on ``scale * q``, per group of heads with the same dilation. Half-precision inputs
    run in fp32 (the kernel's own buffers and softmax are fp32; the result is cast back), except bf16 on
    the fused kernel, whose products run in bf16 with fp32 softmax statistics. The fused kernel applies
    the scale itself; the pure-PyTorch kernel gets a scaled copy of q."""
    if q.element_size() < 4 and not fused:
        with torch.autocast(q.device.type, enabled=False):
            out = _blocked(q.float(), k.float(), v.float(), pattern, key_padding_mask, global_mask,
                           None if alibi_slopes is None else alibi_slopes.float(), chunk, fused=fused,
                           scale=scale)
        return out.to(q.dtype)
    if fused:
        band = functools.partial(fused_kernel.fused_band_attention, scale=scale)
    else:
        band, q = band_attention, q * scale
    B, H, n, d = q.shape
    key_valid = key_padding_mask
    kg = vg = g_pos = g_valid = None
    if global_mask is not None:
        idx, g_valid = global_index(global_mask)
        kg, vg, g_pos = _gather_seq(k, idx), _gather_seq(v, idx), idx
        if key_padding_mask is not None:
            g_valid = g_valid & torch.gather(key_padding_mask, 1, idx)
        # global keys come in through kg/vg; remove them from the band so none is counted twice
        key_valid = ~global_mask if key_valid is None else key_valid & ~global_mask

    dils = pattern.head_dilations(H)
    outs, order = [], []
    for dil in sorted(set(dils)):
        heads = [h for h in range(H) if dils[h] == dil]
        sel = (lambda x: x) if len(heads) == H else (lambda x, hs=torch.tensor(heads, device=q.device): x.index_select(1, hs))
        qh, kh, vh = sel(q), sel(k), sel(v)
        slopes = None if alibi_slopes is None else alibi_slopes[heads]
        kgh, vgh = (None, None) if kg is None else (sel(kg), sel(vg))
        if dil == 1:
            pos, kv = torch.arange(n, device=q.device), key_valid
            o = band(qh, kh, vh, pattern, pos, key_valid=kv, kg=kgh, vg=vgh, g_pos=g_pos,
                               g_valid=g_valid, alibi_slopes=slopes, chunk=chunk)
        else:
            perm = dilation_permutation(n, dil, q.device)
            kv = None if key_valid is None else key_valid[:, perm]
            o = band(qh[:, :, perm], kh[:, :, perm], vh[:, :, perm], pattern, perm, dilation=dil,
                               key_valid=kv, kg=kgh, vg=vgh, g_pos=g_pos, g_valid=g_valid,
                               alibi_slopes=slopes, chunk=chunk)
            o = o[:, :, torch.argsort(perm)]
        outs.append(o)
        order.extend(heads)
    if len(outs) == 1:
        return outs[0]
    return torch.cat(outs, dim=1)[:, torch.argsort(torch.tensor(order, device=q.device))]


def _global_rows(out, qg, kg, vg, pattern, key_padding_mask, global_mask, alibi_slopes, scale: float = 1.0):
    """Write the rows of the global queries (of ``scale * qg``): each attends to every real key (causally
    if causal)."""
    B, H, n, d = out.shape
    idx, valid = global_index(global_mask)
    pos = torch.arange(n, device=out.device)
    scores = (_gather_seq(qg, idx) * scale) @ kg.transpose(-1, -2)  # (B, H, G, n)
    if alibi_slopes is not None:
        scores = scores + alibi_bias(alibi_slopes, idx, pos).transpose(0, 1).to(scores.dtype)
    mask = compose(False, idx[:, None, :, None], pos.view(1, 1, 1, n), causal=pattern.causal,
                   key_valid=None if key_padding_mask is None else key_padding_mask[:, None, None, :],
                   q_global=torch.ones(B, 1, idx.shape[1], 1, dtype=torch.bool, device=out.device))
    rows = masked_softmax(scores, mask) @ vg  # (B, H, G, d)
    if torch.compiler.is_compiling():  # no data-dependent shape: unused slots write their rows back unchanged
        rows = torch.where(valid[:, None, :, None], rows, _gather_seq(out, idx))
        return out.scatter(2, idx[:, None, :, None].expand(rows.shape), rows)
    b_idx, g_idx = valid.nonzero(as_tuple=True)
    out_t = out.transpose(1, 2).index_put((b_idx, idx[b_idx, g_idx]), rows.transpose(1, 2)[b_idx, g_idx])
    return out_t.transpose(1, 2)


def _sdpa(q, k, v, pattern, key_padding_mask, alibi_slopes):
    """Full attention through PyTorch's SDPA; rows with no allowed key give zeros, not NaN."""
    n = q.shape[2]
    if key_padding_mask is None and alibi_slopes is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=pattern.causal, scale=1.0)
    pos = torch.arange(n, device=q.device)
    qp, kp = pos.view(n, 1), pos.view(1, n)
    mask = compose(pattern.local_allowed(qp, kp).view(1, 1, n, n), qp, kp, causal=pattern.causal,
                   key_valid=None if key_padding_mask is None else key_padding_mask[:, None, None, :])
    has_any = mask.any(-1, keepdim=True)
    mask = mask | ~has_any
    if alibi_slopes is not None:
        bias = alibi_bias(alibi_slopes, pos, pos).unsqueeze(0).to(q.dtype)
        mask = bias.masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return out * has_any.to(out.dtype)


_compiled_flex = None


def _flex(q, k, v, pattern, key_padding_mask, global_mask, alibi_slopes):
    """FlexAttention with the pattern's own predicate as mask_mod. Compiled on CUDA (or when
    LONGCTX_FLEX_COMPILE=1); eager elsewhere, which is correct but materialises the scores."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # here: flex attention is optional (torch builds without it)

    B, H, n, d = q.shape
    heads = pattern.head_params(H, q.device).view(H)

    def mask_mod(b, h, qi, ki):
        return compose(pattern.local_allowed(qi, ki, heads[h]), qi, ki, causal=pattern.causal,
                       key_valid=None if key_padding_mask is None else key_padding_mask[b, ki],
                       q_global=None if global_mask is None else global_mask[b, qi],
                       k_global=None if global_mask is None else global_mask[b, ki])

    score_mod = None
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(q.dtype)

        def score_mod(score, b, h, qi, ki):
            return score - slopes[h] * (qi - ki).abs().to(score.dtype)

    per_batch = global_mask is not None or key_padding_mask is not None
    compile_ = q.is_cuda or os.environ.get("LONGCTX_FLEX_COMPILE") == "1"
    block_mask = create_block_mask(mask_mod, B if per_batch else None, H, n, n, device=q.device.type,
                                   _compile=compile_)
    fn = flex_attention
    if compile_:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        fn = _compiled_flex
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0)
