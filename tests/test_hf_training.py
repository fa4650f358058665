"""Training Hugging Face models with attn_implementation="longctx": the loss and the gradient of every
parameter against the same model's eager attention (same weights), backward on longctx's band kernel and
PyTorch's flash kernel (never an n x n tensor), and a short finetuning run step for step.

Tiny random configs (tests/test_hf_interface.py's, whose windows cut at 40 tokens: one-sided window 8 for
ModernBERT's local layers, sliding_window 8 for Mistral), fp32, a batch of three rows: one full, one
right-padded, one left-padded. The loss only reads real positions (labels -100 elsewhere; for a causal LM
also where the *input* is padding, since a padded query's output is garbage under every implementation).

Tolerance: the two implementations sum the same products in a different order (blocks of keys with an
online softmax vs one n x n softmax), so they differ by fp32 rounding: a few ulps of each partial sum. The
loss is held to 1e-5 absolute (it is of order 5). A gradient is held to 1e-5 absolute where its largest
entry is at most 1 and 1e-5 relative to that entry beyond (a rounding error scales with the magnitudes
summed) -- and, since these small random models have gradients as small as 3e-6 (ModernBERT's init), where
1e-5 absolute would pass anything, also to 1e-4 of its own largest entry: measured, the worst parameter
of each model differs by 3e-7 to 7e-7 of its largest entry, fp32 rounding over sums of a few hundred terms.
Both band kernels are held to this: the fused C++ one (where it builds) and the pure-PyTorch one.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (MistralConfig, MistralForCausalLM, ModernBertConfig, ModernBertForMaskedLM,
                          ModernBertForSequenceClassification)

import longctx  # noqa: F401  (registers "longctx")
from test_hf_interface import _configs

N = 40
CAUSAL_LM = {"mistral", "qwen2", "gemma3"}
MODERNBERT = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)


def _model(name):
    """(class, config) with a head that has a loss: MaskedLM for ModernBERT, the CausalLMs as they are."""
    cls, cfg = _configs()[name]
    return (ModernBertForMaskedLM if name == "modernbert" else cls), cfg


def _twins(cls, cfg, impl="longctx"):
    """The same random weights twice, eager and ``impl``, in training mode."""
    torch.manual_seed(0)
    eager = cls(copy.deepcopy(cfg))
    eager.set_attn_implementation("eager")
    other = cls(copy.deepcopy(cfg))
    other.load_state_dict(eager.state_dict())
    other.set_attn_implementation(impl)
    return eager.train(), other.train()


def _batch(name, n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (3, n), generator=g)
    mask = torch.ones(3, n, dtype=torch.long)
    mask[1, n - 11:] = 0  # right padding
    mask[2, :11] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    if name in CAUSAL_LM:  # HF shifts: position t predicts label t+1 from the query at t
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return ids, mask, labels


def _loss_and_grads(model, ids, mask, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def _backward_nodes(loss) -> set[str]:
    """Class names of every node of loss's autograd graph."""
    seen, todo, names = set(), [loss.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


BAND = {"_BandAttentionBackward", "_FusedBandBackward"}  # longctx's band kernel: pure PyTorch or fused C++


@pytest.fixture(params=["torch", "fused"])
def band_kernel(request, monkeypatch):
    """Which band kernel backend "blocked" runs: the pure-PyTorch one, or the fused C++ one (built once)."""
    if request.param == "torch":
        monkeypatch.setenv("LONGCTX_FUSED", "0")
    else:
        request.getfixturevalue("cpp_extension")
    return request.param


@pytest.mark.parametrize("name", ["modernbert", "mistral", "qwen2", "gemma3"])
def test_loss_and_every_gradient_equal_eager(name, band_kernel):
    cls, cfg = _model(name)
    eager, ours = _twins(cls, cfg)
    ids, mask, labels = _batch(name)
    le, ge = _loss_and_grads(eager, ids, mask, labels)
    ll, gl = _loss_and_grads(ours, ids, mask, labels)
    assert abs(le.item() - ll.item()) < 1e-5
    params = {k for k, p in ours.named_parameters() if p.requires_grad}
    assert set(ge) == set(gl) == params  # every parameter has a gradient, under both
    for k in params:
        err = (ge[k] - gl[k]).abs().max().item()
        scale = max(1.0, ge[k].abs().max().item())
        assert err <= 1e-5 * scale, (k, err, scale)
        assert err <= 1e-4 * ge[k].abs().max().item(), (k, err, ge[k].abs().max().item())
        assert torch.isfinite(gl[k]).all(), k
    # the attention projections of every layer get a gradient that is not zero
    q = [k for k in params if "q_proj.weight" in k or "attn.Wqkv.weight" in k]
    assert q and all(ge[k].abs().max() > 0 for k in q)
    # and the kernel asked for ran the sliding layers' backward
    nodes = _backward_nodes(ours(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert {"torch": "_BandAttentionBackward", "fused": "_FusedBandBackward"}[band_kernel] in nodes


@pytest.mark.parametrize("name", ["modernbert", "mistral", "qwen2", "gemma3"])
def test_backward_runs_longctx_kernels(name):
    """The sliding layers' backward is the band kernel's own (flash-style recompute), the global layers'
    is SDPA's flash kernel or the band kernel (a causal global layer with padding): no softmax over a
    materialised score matrix anywhere in the graph, which eager's graph has."""
    cls, cfg = _model(name)
    eager, ours = _twins(cls, cfg)
    ids, mask, labels = _batch(name)
    nodes = _backward_nodes(ours(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert nodes & BAND, sorted(nodes)
    assert "SoftmaxBackward0" not in nodes, sorted(nodes)
    if name == "modernbert":  # bidirectional global layer with key padding: SDPA's flash kernel
        assert "ScaledDotProductFlashAttentionForCpuBackward0" in nodes, sorted(nodes)
    assert "SoftmaxBackward0" in _backward_nodes(eager(input_ids=ids, attention_mask=mask, labels=labels).loss)


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns (forward and backward alike)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest[0]:
                self.largest = (t.numel(), f"{func} {tuple(t.shape)}")
        return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["modernbert", "mistral"])
def test_training_step_makes_no_n_by_n_tensor(name):
    """A training step (forward, backward) at 2,048 tokens, padded, makes no tensor of n^2 / 2 elements
    or more (the band kernel's score blocks are 2^20 elements, a quarter of n^2 here); SDPA's makes
    several (its n x n masks), which shows the probe sees them."""
    n = 2048
    small = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                 max_position_embeddings=n)
    if name == "modernbert":
        cls, cfg = ModernBertForMaskedLM, ModernBertConfig(**small, num_hidden_layers=3, local_attention=128,
                                                           global_attn_every_n_layers=3, **MODERNBERT)
    else:
        cls, cfg = MistralForCausalLM, MistralConfig(**small, num_hidden_layers=2, num_key_value_heads=1,
                                                     sliding_window=128)
    sdpa, ours = _twins(cls, cfg, "longctx")
    sdpa.set_attn_implementation("sdpa")
    ids, mask, labels = _batch(name, n)
    for model, small_enough in ((ours, True), (sdpa, False)):
        probe = _LargestTensor()
        with probe:
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        assert (probe.largest[0] < n * n // 2) == small_enough, probe.largest


def test_training_keeps_no_fused_projection_buffer(monkeypatch):
    """ModernBERT splits q, k, v out of one fused projection (Wqkv) and v stays a view of it: a kernel that
    saves that view for backward keeps the whole buffer, 3x v. The longctx path saves a compact copy
    instead (docs/benchmarks.md, "Eighth session"): no tensor saved for backward on either of its layer
    kinds (band kernel, SDPA) holds a storage of the Wqkv output's size."""
    n, h = 96, 32
    cfg = ModernBertConfig(vocab_size=97, hidden_size=h, intermediate_size=2 * h, num_attention_heads=2,
                           num_hidden_layers=3, local_attention=16, global_attn_every_n_layers=3,
                           max_position_embeddings=n, **MODERNBERT)
    eager, ours = _twins(ModernBertForMaskedLM, cfg, "longctx")
    ids, mask, labels = _batch("modernbert", n)
    qkv_bytes = ids.shape[0] * n * 3 * h * 4
    sizes = []

    def pack(t):
        sizes.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ours(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert sizes and qkv_bytes not in sizes
    loss.backward()
    eager(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, a), b in zip(ours.named_parameters(), eager.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5), name
    # without the copy the kernels do keep it: the probe sees the buffer
    from longctx.hf import attention_interface

    monkeypatch.setattr(attention_interface, "_own_storage", lambda x: x)
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ours(input_ids=ids, attention_mask=mask, labels=labels)
    assert qkv_bytes in sizes


def test_finetuning_steps_equal_eager():
    """ModernBertForSequenceClassification (global and local layers, window cutting at 40 tokens), 20 AdamW
    steps on fixed random padded batches from the same init: the losses agree at every step (1e-4: the
    1e-7-level rounding differences of each step feed into the next step's weights, and AdamW's update
    divides by the root of the second moment, which can amplify them; measured: 2.4e-7 at most over the 20
    steps), and the model learns (the loss falls from 1.5 to under 0.01)."""
    _, cfg = _configs()["modernbert"]
    cfg = copy.deepcopy(cfg)
    cfg.num_labels = 2
    eager, ours = _twins(ModernBertForSequenceClassification, cfg)
    g = torch.Generator().manual_seed(4)
    batches = []
    for _ in range(4):
        # rows of 40, 29 and 20 tokens, padded on the right as an encoder pads: the head pools the first
        # ([CLS]) position, which must be a real token (a padded query's output is no implementation's to fix)
        ids = torch.randint(3, 97, (3, N), generator=g)
        mask = (torch.arange(N)[None, :] < torch.tensor([[N], [29], [20]])).long()
        batches.append((ids, mask, torch.randint(2, (3,), generator=g)))
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (eager, ours)]
    losses = {0: [], 1: []}
    for step in range(20):
        ids, mask, labels = batches[step % len(batches)]
        for i, (model, opt) in enumerate(zip((eager, ours), opts)):
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            losses[i].append(loss.item())
        assert abs(losses[0][-1] - losses[1][-1]) < 1e-4, (step, losses[0][-1], losses[1][-1])
    assert sum(losses[1][-4:]) < sum(losses[1][:4])  # it learns the fixed batches


def test_bench_hf_skips_eager_by_its_estimate(tmp_path):
    """Eager at a length whose n x n tensors exceed the memory cap is skipped with the estimate, before any
    process starts (no shorter case to scale from: the estimate is eager's own scores)."""
    import json

    from longctx.bench.hf import eager_bytes
    from longctx.cli import main
    out = tmp_path / "bench"
    assert main(["bench", "hf", "--modes", "train", "--lengths", "65536", "--models", "mistral", "--impl", "eager",
                 "--memory-cap", "16", "--out", str(out)]) == 0
    [case] = json.loads((out / "results.json").read_text())["cases"]
    assert case["status"] == "skipped" and "> memory cap 16 GB" in case["reason"]
    assert (case["mode"], case["dtype"]) == ("train", "float32")
    # 2 layers' (16, n, n) fp32 probabilities kept for backward, plus one layer's scores and their gradient
    assert eager_bytes("mistral", 65536, "train", "float32", None) == (2 + 2) * 16 * 65536 ** 2 * 4


@pytest.mark.slow
def test_bench_hf_train_case_runs(tmp_path):
    """`longctx bench hf --modes train` runs finetuning steps, fp32 and bf16 autocast, and reports tokens/s."""
    import json

    from longctx.cli import main
    out = tmp_path / "bench"
    assert main(["bench", "hf", "--modes", "train", "--dtypes", "float32", "bfloat16", "--lengths", "64",
                 "--models", "modernbert", "--impl", "longctx", "--layers", "1", "--hidden", "128",
                 "--repeats", "1", "--warmup", "1", "--out", str(out)]) == 0
    cases = json.loads((out / "results.json").read_text())["cases"]
    assert [(c["dtype"], c["mode"]) for c in cases] == [("float32", "train"), ("bfloat16", "train")]
    for c in cases:
        if c["status"] == "skipped":  # a CPU without bf16 units
            assert c["dtype"] == "bfloat16" and "bf16" in c["reason"]
            continue
        assert c["status"] == "ok" and c["finite"] and c["tokens_per_s"] == pytest.approx(64 / c["step_s"])
        assert c["peak_bytes"] >= 0
    assert "Finetuning step" in (out / "results.md").read_text()


@pytest.mark.parametrize("name", ["qwen2", "gemma3"])
def test_right_padded_causal_global_layers_run_sdpa_flash(name):
    """A causal global layer with right padding only (how causal-LM finetuning batches are padded) runs
    SDPA's causal flash kernel, forward and backward, with no mask: the loss and gradients equal eager's."""
    cls, cfg = _model(name)
    eager, ours = _twins(cls, cfg)
    ids, _, _ = _batch(name)
    mask = (torch.arange(N)[None, :] < torch.tensor([[N], [29], [17]])).long()
    labels = ids.masked_fill(mask == 0, -100)
    le, ge = _loss_and_grads(eager, ids, mask, labels)
    ll, gl = _loss_and_grads(ours, ids, mask, labels)
    assert abs(le.item() - ll.item()) < 1e-5
    for k in ge:
        err = (ge[k] - gl[k]).abs().max().item()
        assert err <= 1e-5 * max(1.0, ge[k].abs().max().item()) and err <= 1e-4 * ge[k].abs().max().item(), k
    nodes = _backward_nodes(ours(input_ids=ids, attention_mask=mask, labels=labels).loss)
    assert "ScaledDotProductFlashAttentionForCpuBackward0" in nodes and nodes & BAND, sorted(nodes)


@pytest.mark.parametrize("name", ["modernbert", "mistral"])
def test_bf16_autocast_training_step(name):
    """A training step under CPU autocast to bf16 (fp32 weights), the window cutting: longctx's loss and
    gradients follow eager's under the same autocast to bf16's precision (8 bits of mantissa: 2^-8 = 0.4%
    per rounding, a few roundings deep), and are finite. Mistral's rotary embedding leaves q and k in fp32
    beside a bf16 v there, which the kernels get in one dtype."""
    cls, cfg = _model(name)
    eager, ours = _twins(cls, cfg)
    ids, mask, labels = _batch(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        le, ge = _loss_and_grads(eager, ids, mask, labels)
        ll, gl = _loss_and_grads(ours, ids, mask, labels)
    assert abs(le.item() - ll.item()) < 2e-2 * abs(le.item())
    for k in ge:
        assert torch.isfinite(gl[k]).all(), k
        scale = ge[k].abs().max().item()
        assert (ge[k] - gl[k]).abs().max().item() <= 0.1 * scale + 1e-6, k
