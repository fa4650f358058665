"""The fused CPU band kernel: ``blocked.py``'s band geometry, one C++/OpenMP tile per (query chunk, head).

The pure-PyTorch kernel (``blocked.band_attention``) runs each group of chunks as a chain of operators
(scores, mask, softmax, PV; in backward recompute, dP, dS and three products), each a pass over the
score block in memory, plus Python dispatch per head and group. Here one tile's scores stay in a
per-thread buffer from Q K^T through mask and softmax to P V, and in backward from the recompute through
dS to the gradient products (``longctx/csrc/band_attention.cpp``). Only each row's allowed keys get an exp,
and a tile's products cover only the band columns some row may attend. The fp32 products run on oneDNN's
BRGEMM micro-kernel through ATen. The bf16 products run on the kernel's own AVX512-BF16 micro-kernel
(``vdpbf16ps``, fp32 accumulation) where the build targets a CPU with that extension (``-march=native``):
the B operands VNNI-packed (pairs of rows interleaved) once per head and task where they are reused across
query chunks (K^T, V^T, K, V), P and dS packed by the tile as it rounds them to bf16, A operands read as
they are; on a CPU without AVX512-BF16 they run on MKL's gemm_bf16bf16f32. ``LONGCTX_FUSED_GEMM=mkl``
(read per call) puts every product on MKL (sgemm, gemm_bf16bf16f32), for comparison;
``bf16_products()`` says which bf16 path this process takes (the benchmarks record it). Softmax
statistics are fp32 in both dtypes. ``LONGCTX_FUSED_PROFILE=1`` times the kernel's phases (``profile()``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` (about a minute) and
cached under ``longctx.paths.cache_root()/ext``, keyed by the source, the PyTorch version and the CPU's
flags (it is built with ``-march=native``). Without a C++ compiler (or ninja), or if the build fails,
``attention(backend="blocked")`` runs the pure-PyTorch kernel and says so once in the log;
``backend="fused"`` asks for this kernel and raises instead. When this kernel runs, and the
``LONGCTX_FUSED`` policy (never / only a prebuilt copy / build on first use), are decided in
``dispatch.py``, which asks ``load`` here.

Masks are what ``blocked.BandGeometry`` already builds from the pattern's predicate and ``compose``:
the pattern on one chunk (or per chunk for a permuted, dilated sequence) and the key validity; the C++
side only ANDs them, so every pattern of the family runs here unchanged.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from longctx.attention.blocked import BandGeometry
from longctx.attention.patterns import AttentionPattern
from longctx.errors import LongctxError
from longctx.paths import cache_root

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
# one library: the band kernel, the caching CPU allocator (``longctx.cpu_cache``), dropout (``longctx.dropout``)
# and the cross-entropy (``longctx.loss``)
SOURCES = (CSRC / "band_attention.cpp", CSRC / "cpu_cache.cpp", CSRC / "dropout.cpp", CSRC / "cross_entropy.cpp")
HEADERS = (CSRC / "vec.h",)
# no -std: PyTorch passes the standard its own headers need (C++17 in older releases, C++20 in newer ones)
CFLAGS = ["-O3", "-march=native", "-fopenmp"]
# dtypes the kernel takes; others (fp16, fp64) run the pure-PyTorch kernel
DTYPES = (torch.float32, torch.bfloat16)

_state: dict = {"loaded": False, "why_not": None}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform
    return platform.processor()


def build_dir() -> Path:
    """Cache folder of the build: a new key for a new source, PyTorch or CPU (``-march=native``)."""
    key = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES + HEADERS) + torch.__version__.encode()
                         + _cpu_flags().encode() + " ".join(CFLAGS).encode()).hexdigest()[:16]
    return cache_root() / "ext" / f"band_attention-{key}"


def compiler_missing() -> str | None:
    """Why the extension cannot be built here, or None: a C++ compiler and ninja must be on PATH."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r}) on PATH"
    if shutil.which("ninja") is None and shutil.which("ninja", path=str(Path(sys.executable).parent)) is None:
        return "ninja is not installed (pip install ninja)"
    return None


def is_built() -> bool:
    """The extension is loaded in this process, or a build of the current source is in the cache."""
    return _state["loaded"] or any(build_dir().glob("*.so"))


def load(build: bool = True) -> bool:
    """Load the extension (compiling it once if ``build``); False, logged once, where it cannot be."""
    if _state["loaded"]:
        return True
    if _state["why_not"] is not None:
        return False
    why = compiler_missing()
    if why is None and not build and not is_built():
        return False  # not built yet, and the caller would rather not wait for it now
    if why is None:
        try:
            _compile()
            _state["loaded"] = True
            return True
        except Exception as e:  # a failed build leaves the pure-PyTorch kernel, which is always correct
            why = f"building it failed ({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''})"
    _state["why_not"] = why
    log.warning("fused CPU attention kernel unavailable: %s; using the pure-PyTorch blocked kernel", why)
    return False


def _compile() -> None:
    from torch.utils.cpp_extension import load as load_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    venv_bin = str(Path(sys.executable).parent)  # ninja from pip lives next to the interpreter
    if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + venv_bin
    if not is_built():
        log.warning("compiling the fused CPU attention kernel (once, about a minute; cached in %s)", out)
    load_extension(name="longctx_band_attention", sources=[str(p) for p in SOURCES], extra_cflags=CFLAGS,
                   extra_ldflags=["-fopenmp"], build_directory=str(out), is_python_module=False,
                   verbose=False)


# the kernel's phases, in the order of band_attention.cpp's Phase
PHASES = ("spans", "QK^T", "mask", "softmax", "PV", "dP", "dS", "dV dK", "dQ", "copy")


def profile(reset: bool = True) -> dict[str, float]:
    """Seconds per phase of the fused kernel since the last reset, summed over threads; all zero unless
    ``LONGCTX_FUSED_PROFILE`` was set when the extension loaded (the timers are off otherwise)."""
    require()
    return dict(zip(PHASES, torch.ops.longctx_fused.band_profile(reset).tolist()))


def bf16_products() -> str:
    """Which path the kernel's bf16 products take in this process: "avx512-bf16 micro-kernel" (the
    kernel's own, in a build for a CPU with AVX512-BF16), or MKL's gemm_bf16bf16f32 (with the reason:
    ``LONGCTX_FUSED_GEMM=mkl``, or a build without AVX512-BF16); "fused kernel unavailable" where the
    extension is not built (this never compiles it)."""
    if not load(build=False):
        return "fused kernel unavailable"
    return torch.ops.longctx_fused.bf16_products()


def require() -> None:
    """For backend "fused": build or raise one sentence."""
    if os.environ.get("LONGCTX_FUSED") == "0":
        raise LongctxError("backend 'fused' was asked for but LONGCTX_FUSED=0 turns the fused kernel off")
    if not load(build=True):
        raise LongctxError(f"backend 'fused' is unavailable: {_state['why_not']}; use backend 'blocked'")


class _Masks:
    """The tensors the C++ tile reads to decide which pairs are allowed (see band_attention.cpp)."""

    def __init__(self, geo: BandGeometry, pattern: AttentionPattern, dilation: int, pos, key_valid, g_pos,
                 g_valid, B: int):
        c, dev = geo.c, pos.device
        if geo.base is not None:  # shift-invariant: one chunk's predicate serves every chunk
            local = geo.base.unsqueeze(0)
        else:
            local = pattern.local_allowed(geo.q_pos, geo.k_pos, dilation)  # (nc, c, span)
        self.local = local.expand(-1, c, geo.span).to(torch.uint8).contiguous()
        kv = torch.ones(1, geo.n, dtype=torch.bool, device=dev) if key_valid is None else key_valid.bool()
        self.kvalid = F.pad(kv, (geo.left, geo.right), value=False).to(torch.uint8).contiguous()  # (Bk, nk*c)
        p32 = pos.to(torch.int32)
        self.q_pos = F.pad(p32, (0, geo.nc * c - geo.n)).contiguous()
        self.k_pos = F.pad(p32, (geo.left, geo.right)).contiguous()
        empty_i, empty_u = torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.uint8)
        self.g_pos = empty_i if g_pos is None else g_pos.to(torch.int32).reshape(B, -1).contiguous()
        self.g_valid = empty_u if g_valid is None else g_valid.to(torch.uint8).reshape(B, -1).contiguous()
        self.causal = bool(pattern.causal)

    def args(self, slopes: torch.Tensor, B: int, H: int, left: int):
        return (self.local, self.kvalid, self.q_pos, self.k_pos, self.g_pos, self.g_valid, slopes, B, H,
                self.causal, left)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, H, n, d) as the kernel reads it: any strides with dense rows (the layer's (B, n, H, d)
    projections seen as (B, H, n, d) go in as they are); a copy only for other layouts."""
    return x if x.stride(-1) == 1 and x.stride(-2) >= x.shape[-1] else x.contiguous()


class _FusedBand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kg, vg, slopes, geo: BandGeometry, masks: _Masks, scale: float):
        B, H, n, d = q.shape
        empty = q.new_zeros(0)
        q_, k_, v_ = _rows(q), _rows(k), _rows(v)
        kg_ = empty if kg is None else kg.to(q.dtype).contiguous()
        vg_ = empty if vg is None else vg.to(q.dtype).contiguous()
        sl = torch.zeros(0) if slopes is None else slopes.detach().float().contiguous()
        # out: (B, H, n, d) seen over (B, n, H, d) memory, so the layer's merge of the heads is a view
        out, lse = torch.ops.longctx_fused.band_forward(q_, k_, v_, kg_, vg_, *masks.args(sl, B, H, geo.left), scale)
        ctx.save_for_backward(q_, k_, v_, kg_, vg_, out, lse, sl)
        ctx.geo, ctx.masks, ctx.scale = geo, masks, scale
        ctx.dtypes = (q.dtype, None if kg is None else kg.dtype, None if slopes is None else slopes.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        q_, k_, v_, kg_, vg_, out, lse, sl = ctx.saved_tensors
        geo, masks = ctx.geo, ctx.masks
        B, H, n, d = q_.shape
        q_dt, g_dt, s_dt = ctx.dtypes
        dq, dk, dv, dkg, dvg, dsl = torch.ops.longctx_fused.band_backward(
            q_, k_, v_, kg_, vg_, out, _rows(dout.to(q_dt)), lse, *masks.args(sl, B, H, geo.left), ctx.scale)
        groups = H // k_.shape[1]
        if groups > 1:  # grouped-query attention: the kernel's dK, dV are per query head, in (B, n, H, d)
            # memory and the input's dtype; each group sums over neighbouring heads there (bf16: the heads'
            # rounded values accumulated in fp32 and rounded again, as autograd sums repeated k, v)
            dk, dv = (x.transpose(1, 2).unflatten(2, (k_.shape[1], groups)).sum(3).transpose(1, 2) for x in (dk, dv))
        dq, dk, dv = dq.to(q_dt), dk.to(q_dt), dv.to(q_dt)
        G = kg_.shape[2] if g_dt is not None else 0
        dkg = None if g_dt is None else dkg.view(B, H, G, d).to(g_dt)
        dvg = None if g_dt is None else dvg.view(B, H, G, d).to(g_dt)
        dslopes = None if s_dt is None or not ctx.needs_input_grad[5] else dsl.view(B, H).sum(0).to(s_dt)
        return dq, dk, dv, dkg, dvg, dslopes, None, None, None


def fused_band_attention(q, k, v, pattern: AttentionPattern, pos, *, dilation: int = 1, key_valid=None,
                         kg=None, vg=None, g_pos=None, g_valid=None, alibi_slopes=None, chunk=None,
                         scale: float = 1.0):
    """``blocked.band_attention`` of ``scale * q`` on the fused kernel (same arguments, same result; the
    scale is applied inside, so q is not copied). k and v may have fewer heads than q (grouped-query
    attention: Hkv dividing H, query head h reading key head h // (H / Hkv)), without global keys. fp32 and bf16 run here (bf16 products, fp32 softmax
    statistics), eagerly, on non-empty CPU tensors with the extension loaded: what the dispatcher
    (``dispatch.py``) checks before it chooses this kernel."""
    B, H = q.shape[:2]
    geo = BandGeometry(pattern, dilation, pos, key_valid, g_pos, g_valid, alibi_slopes, B, H, chunk,
                       torch.float32)
    masks = _Masks(geo, pattern, dilation, pos, key_valid, g_pos, g_valid, B)
    with torch.autocast(q.device.type, enabled=False):
        return _FusedBand.apply(q, k, v, kg, vg, alibi_slopes, geo, masks, float(scale))
