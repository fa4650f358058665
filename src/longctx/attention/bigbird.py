"""BigBird (Zaheer et al., 2020), block-sparse attention, its ITC form: the sequence is cut into blocks
of ``block`` tokens; query block i attends the key blocks i-1, i, i+1 (sliding blocks), ``random``
blocks drawn per head and per query block, and the global blocks (the first and last
``global_blocks`` blocks), whose tokens attend everything.

It is a mask pattern: ``BigBirdPattern.local_allowed`` is its predicate, a lookup in the block layout
``R[h, q // block, k // block]`` (sliding and random blocks), and the global blocks are global tokens,
composed onto the predicate like any pattern's (``patterns.compose``). So the dense reference,
FlexAttention's ``mask_mod`` and the layout kernel below all run the same composed predicate.

The random layout is drawn from a generator seeded by (seed, layer, length), so it is the same in every
build, in training and in evaluation (Hugging Face's BigBird replaces it by block 0 in eval mode). The
random blocks of a query block never repeat its sliding or global blocks, so no key is counted twice.
``set_random_blocks`` installs a given layout (Hugging Face's, in the tests).

Fast path (``layout_attention``): for each query block, gather its W = 3 + r key blocks (a layout
instead of the sliding kernel's band) plus the G global keys, one dense product per block, the
composed predicate as mask, a few query blocks per step with the probabilities recomputed in backward;
the rows of global queries are computed over every key. Memory O(n (d + G)), time linear in n for
fixed block and r. For fp32 and bf16 on CPU, with longctx's C++ extension available (the dispatcher's
choice, ``dispatch.py``: kernel "layout-fused"), the non-global rows run on fused tiles instead (``_FusedLayout``,
band_attention.cpp's layout_forward / layout_backward): one (head, query block) at a time, its scores
against the allowed key blocks and the global keys kept in a thread buffer from the products through
the softmax; the PyTorch steps stay the fallback (other dtypes, tracing, no compiler).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longctx.attention import dispatch, fused
from longctx.attention.functional import _global_rows, attention, drop_padded, empty_batch, global_index
from longctx.attention.mechanism import Capabilities, LayerContext, Mechanism, register
from longctx.attention.patterns import compose, full_mask
from longctx.attention.reference import dense_attention, masked_softmax
from longctx.errors import LongctxError


@dataclass(frozen=True)
class Spec:
    block: int = 64          # block size b (BigBird's base: 64)
    random: int = 3          # random key blocks per query block (r)
    global_blocks: int = 1   # global blocks at each end (ITC: the first and the last block)

    def __post_init__(self):
        for name, lo in (("block", 1), ("random", 0), ("global_blocks", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


class BigBirdPattern:
    """The predicate of one length: ``R`` (H, nb, nb) bool, True where query block i may attend key
    block j through the sliding or random blocks. Global blocks come in as global tokens."""

    kind = "bigbird"
    causal = False

    def __init__(self, R: torch.Tensor, block: int):
        self.R, self.block = R, block

    def head_params(self, num_heads: int, device=None) -> torch.Tensor:
        return torch.arange(num_heads, device=device).view(num_heads, 1, 1)

    def local_allowed(self, q_pos, k_pos, head):
        b = self.block
        return self.R[head, torch.div(q_pos, b, rounding_mode="floor"), torch.div(k_pos, b, rounding_mode="floor")]


def draw_layout(H: int, nb: int, random: int, global_blocks: int, generator: torch.Generator) -> torch.Tensor:
    """R (H, nb, nb): sliding blocks |i - j| <= 1, plus ``random`` blocks per head and non-global query
    block, drawn without replacement among the blocks that are neither sliding nor global."""
    idx = torch.arange(nb)
    R = ((idx[:, None] - idx[None, :]).abs() <= 1).expand(H, nb, nb).clone()
    is_global = (idx < global_blocks) | (idx >= nb - global_blocks)
    for h in range(H):
        for i in range(nb):
            if is_global[i]:
                continue  # a global query block attends everything anyway
            cand = idx[~R[h, i] & ~is_global]
            pick = cand[torch.randperm(cand.numel(), generator=generator)[:random]]
            R[h, i, pick] = True
    return R


@register
class BigBird(Mechanism):
    name = "bigbird"
    Spec = Spec
    examples = {"test": {"block": 4, "random": 1}, "bench": {"block": 64, "random": 3, "global_blocks": 1}}
    supports = Capabilities(global_tokens=True)
    kernel_route = "layout"  # its block-layout kernels, FlexAttention or the reference (dispatch.py)

    def __init__(self, spec: Spec, ctx: LayerContext):
        super().__init__(spec, ctx)
        self._layouts: dict[int, torch.Tensor] = {}

    # -- the layout -----------------------------------------------------------------------------------
    def layout(self, n: int, device=None) -> torch.Tensor:
        """R (H, nb, nb) for length n, drawn once per length from the seeded generator."""
        if n not in self._layouts:
            nb = max(1, math.ceil(n / self.spec.block))
            g = torch.Generator().manual_seed((self.ctx.seed * 1_000_003 + self.ctx.layer_idx * 7_919 + n) % 2**63)
            self._layouts[n] = draw_layout(self.ctx.num_heads, nb, self.spec.random, self.spec.global_blocks, g)
        return self._layouts[n].to(device)

    def set_random_blocks(self, n: int, random_blocks) -> None:
        """Install a random layout for length n: ``random_blocks`` (H, nb - 2, r) key-block indices for
        the query blocks 1 .. nb - 2 (Hugging Face's ``rand_attn`` layout)."""
        rb = torch.as_tensor(random_blocks, dtype=torch.long)
        H, nb = self.ctx.num_heads, max(1, math.ceil(n / self.spec.block))
        if rb.dim() != 3 or rb.shape[0] != H or rb.shape[1] != nb - 2:
            raise LongctxError(f"random blocks must be ({H}, {nb - 2}, r) for {n} tokens, got {tuple(rb.shape)}")
        idx = torch.arange(nb)
        R = ((idx[:, None] - idx[None, :]).abs() <= 1).expand(H, nb, nb).clone()
        for h in range(H):
            R[h, torch.arange(1, nb - 1)[:, None].expand_as(rb[h]), rb[h]] = True
        self._layouts[n] = R

    def pattern(self, n: int, device=None) -> BigBirdPattern:
        return BigBirdPattern(self.layout(n, device), self.spec.block)

    def global_tokens(self, n: int, global_mask, device) -> torch.Tensor:
        """The global blocks as a (B or 1, n) global mask, with the caller's global tokens."""
        g = self.spec.global_blocks * self.spec.block
        nb_tokens = max(1, math.ceil(n / self.spec.block)) * self.spec.block
        pos = torch.arange(n, device=device)
        ends = ((pos < g) | (pos >= nb_tokens - g))[None, :]
        return ends if global_mask is None else ends | global_mask.bool()

    # -- attention ------------------------------------------------------------------------------------
    def forward(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None, cache=None):
        if bias is not None:
            raise LongctxError("attention 'bigbird' takes no score bias; use rope or learned positions")
        n = q.shape[2]
        pattern, gm = self.pattern(n, q.device), self.global_tokens(n, global_mask, q.device)
        gm = gm.expand(q.shape[0], n)
        if key_padding is not None:  # padded keys contribute nothing, whatever their values
            k, v = drop_padded(k, key_padding), drop_padded(v, key_padding)
        kernel = dispatch.choose(dispatch.layout_call(self.ctx.backend, q, k, v, key_padding_mask=key_padding,
                                                      global_mask=gm))
        if kernel == "dense":
            return dense_attention(q, k, v, pattern, key_padding_mask=key_padding, global_mask=gm)
        if kernel == "flex":
            return attention(q, k, v, pattern, key_padding_mask=key_padding, global_mask=gm, backend="flex",
                             mechanism=self.name)
        return layout_attention(q, k, v, pattern, key_padding_mask=key_padding, global_mask=gm, kernel=kernel)

    def reference(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        n = q.shape[2]
        gm = self.global_tokens(n, global_mask, q.device).expand(q.shape[0], n)
        return dense_attention(q, k, v, self.pattern(n, q.device), key_padding_mask=key_padding, global_mask=gm)

    def mask(self, n, key_padding=None, global_mask=None, device=None):
        return full_mask(self.pattern(n, device), n, self.ctx.num_heads, key_padding,
                         self.global_tokens(n, global_mask, device), device=device)

    def attention_map(self, q, k, v, *, key_padding=None, global_mask=None, positions=None, bias=None):
        n = q.shape[2]
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        return masked_softmax(scores, self.mask(n, key_padding, global_mask, q.device))

    def flops(self, n: int, num_global: int = 0) -> float:
        """4 d per attended pair, all heads: the block pairs of the layout (sliding, random, global rows
        and columns) times b^2, at most n^2, plus the caller's global rows and columns."""
        b, H = self.spec.block, self.ctx.num_heads
        R = self.layout(n)
        nb = R.shape[-1]
        g = torch.zeros(nb, dtype=torch.bool)
        g[:self.spec.global_blocks] = True
        g[nb - self.spec.global_blocks:] = True
        blocks = (R | g[None, :, None] | g[None, None, :]).sum().item() / H
        pairs = min(n * n, blocks * b * b + 2 * num_global * n)
        return 4.0 * self.ctx.head_dim * H * pairs

    def describe(self) -> str:
        return f"bigbird b={self.spec.block} r={self.spec.random}"


# query blocks per step of the layout kernel: None sizes a step to about STEP_ELEMENTS gathered key
# elements (a few MB, so a step's keys, scores and probabilities stay in cache); tests set small values
GROUP_BLOCKS: int | None = None
STEP_ELEMENTS = 2**21


def layout_attention(q, k, v, pattern: BigBirdPattern, *, key_padding_mask=None, global_mask=None, scale=None,
                     kernel: str | None = None):
    """Block-sparse attention from a block layout (no n x n tensor). q, k, v (B, H, n, d); global_mask
    (B, n) with at least the global blocks; returns (B, H, n, d). ``kernel``: "layout-fused" (the C++
    tiles) or "layout-torch" (the PyTorch steps); None asks the dispatcher (backend "blocked": the fused
    tiles where they take the call).

    The non-global rows run in steps of a few query blocks (``_LayoutSteps``): a step gathers its W key
    blocks and the G global keys, and only the output and the row log-sum-exp are kept for backward,
    which recomputes each step's probabilities (FlashAttention's recompute). Memory O(n d + n G), and
    no (B, H, n / b, W b, b) scores or gathered copies of the whole sequence."""
    B, H, n, d = q.shape
    if B == 0:  # the steps below size their work by the batch
        return empty_batch(q, k, v)
    if kernel is None:
        kernel = dispatch.choose(dispatch.layout_call("blocked", q, k, v, key_padding_mask=key_padding_mask,
                                                      global_mask=global_mask))
    b, R = pattern.block, pattern.R
    nb = R.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    q = q * scale
    gm = global_mask.bool()
    kpm = None if key_padding_mask is None else key_padding_mask.bool()
    # the key blocks of each query block, as indices (H, nb, W); W = the most any row has
    W = int(R.sum(-1).max())
    cols = torch.sort((~R).to(torch.int8), dim=-1, stable=True).indices[..., :W]  # allowed blocks first
    col_ok = torch.gather(R, -1, cols)  # (H, nb, W)
    pad = nb * b - n

    def blocks(x):  # (B, H, n, d) -> (B, H, nb, b, d), zero-padded
        return F.pad(x, (0, 0, 0, pad)).view(B, H, nb, b, d)

    # a band key is valid if real and not global (global keys come in once, below)
    valid = F.pad(~gm if kpm is None else kpm & ~gm, (0, pad), value=False).view(B, nb, b)
    idx, g_valid = global_index(gm)  # (B, G)
    if kpm is not None:
        g_valid = g_valid & torch.gather(kpm, 1, idx)
    kg = torch.gather(k, 2, idx[:, None, :, None].expand(B, H, idx.shape[1], d))
    vg = torch.gather(v, 2, idx[:, None, :, None].expand(B, H, idx.shape[1], d))
    group = GROUP_BLOCKS or max(1, STEP_ELEMENTS // max(1, B * H * (W * b + idx.shape[1]) * d))
    layout = _Layout(cols, col_ok, valid, g_valid, group)
    if kernel == "layout-fused":
        def rows(x):  # (B, H, nb b, d), zero-padded; the layer's strided projections go in as they are
            return x if pad == 0 else F.pad(x, (0, 0, 0, pad))
        with torch.autocast(q.device.type, enabled=False):
            out = _FusedLayout.apply(rows(q), rows(k), rows(v), kg, vg, layout)[:, :, :n]
    else:
        out = _LayoutSteps.apply(blocks(q), blocks(k), blocks(v), kg, vg, layout)
        out = out.reshape(B, H, nb * b, d)[:, :, :n]
    # the rows of global queries attend to every real key
    return _global_rows(out, q, k, v, pattern, kpm, gm, None)


class _Layout:
    """What a step needs to know of the layout: key-block indices ``cols`` (H, nb, W) and whether each
    is allowed ``col_ok``, band-key validity ``valid`` (B, nb, b), global-key validity ``g_valid``
    (B, G), and the query blocks per step."""

    def __init__(self, cols, col_ok, valid, g_valid, group):
        self.cols, self.col_ok, self.valid, self.g_valid, self.group = cols, col_ok, valid, g_valid, group
        H, nb, W = cols.shape
        self.h_idx = torch.arange(H, device=cols.device).view(H, 1, 1)
        self.flat = (self.h_idx * nb + cols)  # key block (h, j) as row h * nb + j of a (B, H nb, b, d) view

    def kernel_masks(self):
        """cols, col_ok, valid, g_valid as the C++ kernel reads them (contiguous; int64 and uint8)."""
        return (self.cols.long().contiguous(), self.col_ok.to(torch.uint8).contiguous(),
                self.valid.to(torch.uint8).contiguous(), self.g_valid.to(torch.uint8).contiguous())

    def steps(self):
        nb = self.cols.shape[1]
        return [(i, min(nb, i + self.group)) for i in range(0, nb, self.group)]

    def gather(self, xb, i0, i1):
        """The key blocks of query blocks i0..i1: (B, H, nb, b, d) -> (B, H, g, W b, d), whole blocks copied
        by ``index_select`` (advanced indexing copied element by element: 1.4x the time, and 10x from 4,096
        to 32,768 tokens where the work grows 8x)."""
        B, H, nb, b, d = xb.shape
        rows = self.flat[:, i0:i1].reshape(-1)
        return xb.reshape(B, H * nb, b * d).index_select(1, rows).view(B, H, i1 - i0, -1, d)

    def allowed(self, i0, i1):
        """(B, H, g, 1, W b + G): the keys every row of query blocks i0..i1 may attend."""
        B, _, b = self.valid.shape
        H, _, W = self.cols.shape
        # the one rule (patterns.compose); BigBird is not causal, so positions do not enter
        band = compose(self.col_ok[:, i0:i1, :, None], None, None, causal=False,
                       key_valid=self.valid[:, self.cols[:, i0:i1]])  # (B, H, g, W, b)
        glob = compose(False, None, None, causal=False, key_valid=self.g_valid.view(B, 1, 1, 1, -1), k_global=True)
        G = self.g_valid.shape[1]
        return torch.cat([band.reshape(B, H, i1 - i0, 1, W * b), glob.expand(B, H, i1 - i0, 1, G)], -1)


def _step_probs(qb, kk, kg, ok, lse=None):
    """Scores of one step's queries over its keys (band then global), masked; the probabilities (fp32 or wider)
    and the row log-sum-exp. With ``lse`` given (backward), the probabilities from it."""
    s = torch.cat([qb @ kk.transpose(-1, -2), qb @ kg.unsqueeze(2).transpose(-1, -2)], -1)
    s = s.to(torch.promote_types(s.dtype, torch.float32))  # bf16/fp16 scores softmaxed in fp32
    s = s.masked_fill(~ok, float("-inf"))
    if lse is None:
        m = s.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row with no allowed key
        p = torch.exp(s - m)
        total = p.sum(-1, keepdim=True)
        lse = torch.where(total > 0, m + torch.log(total), torch.full_like(m, float("inf")))
    return torch.exp(s - lse), lse


class _LayoutSteps(torch.autograd.Function):
    """Non-global rows of the layout kernel, a few query blocks at a time, recomputed in backward."""

    @staticmethod
    def forward(ctx, qb, kb, vb, kg, vg, layout: _Layout):
        B, H, nb, b, d = qb.shape
        Wb = layout.cols.shape[-1] * b
        kb, vb = kb.contiguous(), vb.contiguous()  # (B, H nb, b d) views for the steps' block gathers
        out = torch.empty_like(qb)
        lse = qb.new_empty(B, H, nb, b, 1, dtype=torch.promote_types(qb.dtype, torch.float32))
        for i0, i1 in layout.steps():
            p, lse[:, :, i0:i1] = _step_probs(qb[:, :, i0:i1], layout.gather(kb, i0, i1), kg, layout.allowed(i0, i1))
            p = p.to(vb.dtype)
            out[:, :, i0:i1] = p[..., :Wb] @ layout.gather(vb, i0, i1) + p[..., Wb:] @ vg.unsqueeze(2)
        ctx.save_for_backward(qb, kb, vb, kg, vg, out, lse)
        ctx.layout = layout
        return out

    @staticmethod
    def backward(ctx, dout):
        qb, kb, vb, kg, vg, out, lse = ctx.saved_tensors
        layout = ctx.layout
        B, H, nb, b, d = qb.shape
        Wb = layout.cols.shape[-1] * b
        dout = dout.contiguous()
        acc = lse.dtype  # fp32, or fp64 for a float64 model
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dO * O) = sum_j P dP
        dq = torch.empty_like(qb)
        dkb = torch.zeros(B, H * nb, b, d, dtype=acc, device=qb.device)
        dvb = torch.zeros_like(dkb)
        dkg = torch.zeros(kg.shape, dtype=acc, device=qb.device)
        dvg = torch.zeros_like(dkg)
        vg_ = vg.unsqueeze(2)
        for i0, i1 in layout.steps():
            q_, do_ = qb[:, :, i0:i1], dout[:, :, i0:i1]
            kk, vv = layout.gather(kb, i0, i1), layout.gather(vb, i0, i1)
            p, _ = _step_probs(q_, kk, kg, layout.allowed(i0, i1), lse[:, :, i0:i1])
            dp = torch.cat([do_ @ vv.transpose(-1, -2), do_ @ vg_.transpose(-1, -2)], -1).to(acc)
            ds = (p * (dp - delta[:, :, i0:i1])).to(qb.dtype)
            p = p.to(qb.dtype)
            dq[:, :, i0:i1] = ds[..., :Wb] @ kk + ds[..., Wb:] @ kg.unsqueeze(2)
            rows = layout.flat[:, i0:i1].reshape(-1)  # (H g W,) key blocks, head-major like the views below
            dkb.index_add_(1, rows, (ds[..., :Wb].transpose(-1, -2) @ q_).to(acc).reshape(B, -1, b, d))
            dvb.index_add_(1, rows, (p[..., :Wb].transpose(-1, -2) @ do_).to(acc).reshape(B, -1, b, d))
            dkg += torch.einsum("bhgcm,bhgcd->bhmd", ds[..., Wb:].to(acc), q_.to(acc))
            dvg += torch.einsum("bhgcm,bhgcd->bhmd", p[..., Wb:].to(acc), do_.to(acc))
        dkb, dvb = (x.view(B, H, nb, b, d).to(kb.dtype) for x in (dkb, dvb))
        return dq, dkb, dvb, dkg.to(kg.dtype), dvg.to(vg.dtype), None


class _FusedLayout(torch.autograd.Function):
    """Non-global rows of the layout kernel on the fused C++ tiles: one (head, query block) at a time,
    its scores against the allowed key blocks and the global keys kept in a thread buffer through mask,
    softmax and P V; backward one task per (batch, head), recomputing the probabilities from the saved
    log-sum-exp. q, k, v (B, H, nb b, d), q scaled; returns (B, H, nb b, d)."""

    @staticmethod
    def forward(ctx, q, k, v, kg, vg, layout: _Layout):
        masks = layout.kernel_masks()
        q_, k_, v_ = fused._rows(q), fused._rows(k), fused._rows(v)
        kg_, vg_ = kg.to(q.dtype).contiguous(), vg.to(q.dtype).contiguous()
        out, lse = torch.ops.longctx_fused.layout_forward(q_, k_, v_, kg_, vg_, *masks)
        ctx.save_for_backward(q_, k_, v_, kg_, vg_, out, lse)
        ctx.masks, ctx.dtypes = masks, (q.dtype, kg.dtype, vg.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q_, k_, v_, kg_, vg_, out, lse = ctx.saved_tensors
        dt, kg_dt, vg_dt = ctx.dtypes
        dq, dk, dv, dkg, dvg = torch.ops.longctx_fused.layout_backward(
            q_, k_, v_, kg_, vg_, out, fused._rows(dout.to(dt)), lse, *ctx.masks)
        return dq.to(dt), dk.to(dt), dv.to(dt), dkg.to(kg_dt), dvg.to(vg_dt), None
