"""The mechanism contract (attention/mechanism.py), checked on every registered mechanism: the one place a
new mechanism is tested, with no table to edit. The parameter list is read from ``MECHANISMS`` when this
module is collected; each mechanism runs on its ``test`` example (``Mechanism.examples``), encoder and,
where it has one, causal form.

Oracles: the mechanism's own ``reference`` (outputs, and gradients of q, k, v and its parameters; fp32,
1e-5 as tests/test_attention_equivalence.py) and its ``attention_map`` (A @ v is what ``forward``
computed). The families' tests (tests/test_families.py, tests/test_bigbird.py, the kernels' equivalence
tests) hold the same oracles over random shapes, padding and fp64, and each family to its peers' code.
"""
import pytest
import torch

import longctx.attention  # noqa: F401  (registers every mechanism)
from longctx.attention.masked import Sliding
from longctx.attention.mechanism import MECHANISMS, LayerContext, Mechanism, build, make_spec, register
from longctx.errors import LongctxError

B, H, D, N, MAX_LEN = 2, 2, 8, 37, 64  # the shape the "test" examples are for (mechanism.py)
TOL = dict(atol=1e-5, rtol=1e-5)


def cases():
    """(name, causal) for every registered mechanism: its encoder form, and its causal form where it has one."""
    out = []
    for name, cls in sorted(MECHANISMS.items()):
        out.append(pytest.param(name, False, id=name))
        if cls.supports.causal:
            out.append(pytest.param(name, True, id=f"{name}-causal"))
    return out


def _build(name, causal, seed=3):
    ctx = LayerContext(num_heads=H, head_dim=D, max_len=MAX_LEN, causal=causal, seed=seed)
    return build(name, MECHANISMS[name].example("test"), ctx).eval()


def _inputs(cls, seed=0):
    """q, k, v (B, H, N, d) fp32 leaves; key padding (the second row's last 6 tokens); global tokens where
    the mechanism takes them."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g).requires_grad_() for _ in range(3))
    kp = torch.ones(B, N, dtype=torch.bool)
    kp[1, N - 6:] = False
    gm = None
    if cls.supports.global_tokens:
        gm = torch.zeros(B, N, dtype=torch.bool)
        gm[:, [0, 11, 23]] = True
    return q, k, v, {"key_padding": kp, "global_mask": gm}


def _real_rows(t, kw):
    """Rows of real queries (padded queries' outputs are discarded by every model)."""
    return t * kw["key_padding"][:, None, :, None].to(t.dtype)


def check_forward_equals_reference(name, causal):
    mech = _build(name, causal)
    q, k, v, kw = _inputs(type(mech))
    out, ref = mech(q, k, v, **kw), mech.reference(q, k, v, **kw)
    assert out.shape == ref.shape == (B, H, N, D)
    torch.testing.assert_close(out, ref, **TOL)
    if not ref.requires_grad:
        return  # a reference outside autograd: outputs only
    inputs = [q, k, v] + [p for p in mech.parameters() if p.requires_grad]
    up = _real_rows(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)), kw)
    got = torch.autograd.grad(out, inputs, up, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(ref, inputs, up, allow_unused=True)
    for a, b, x in zip(got, want, inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        torch.testing.assert_close(a, b, **TOL)


def check_attention_map(name, causal):
    mech = _build(name, causal)
    q, k, v, kw = _inputs(type(mech))
    with torch.no_grad():
        if type(mech).attention_map is Mechanism.attention_map:  # not defined: a one-sentence refusal
            with pytest.raises(LongctxError, match="no attention matrix"):
                mech.attention_map(q, k, v, **kw)
            return
        A = mech.attention_map(q, k, v, **kw)
        assert A.shape == (B, H, N, N)
        torch.testing.assert_close(_real_rows(A @ v, kw), _real_rows(mech(q, k, v, **kw), kw), **TOL)


def check_flops_and_describe(name, causal):
    mech = _build(name, causal)
    for n in (1, N, 4096):
        f = mech.flops(n)
        assert isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f < float("inf"), (n, f)
    text = mech.describe()
    assert isinstance(text, str) and text.strip()


def check_unknown_key_is_one_sentence(name):
    with pytest.raises(LongctxError) as e:
        make_spec(name, {**MECHANISMS[name].example("test"), "no_such_key": 1})
    msg = str(e.value)
    assert "no_such_key" in msg and repr(name) in msg
    assert len(msg.splitlines()) == 1 and ". " not in msg.rstrip("."), msg


def check_same_seed_builds_are_identical(name, causal):
    a, b = _build(name, causal), _build(name, causal)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)
    q, k, v, kw = _inputs(type(a))
    with torch.no_grad():
        first = a(q, k, v, **kw)
        assert torch.equal(first, b(q, k, v, **kw))
        assert torch.equal(first, a(q, k, v, **kw))  # evaluation mode: deterministic


@pytest.mark.parametrize("name, causal", cases())
def test_forward_equals_reference_outputs_and_gradients(name, causal):
    check_forward_equals_reference(name, causal)


@pytest.mark.parametrize("name, causal", cases())
def test_attention_map_times_v_is_forward(name, causal):
    check_attention_map(name, causal)


@pytest.mark.parametrize("name, causal", cases())
def test_flops_are_a_positive_number_and_describe_a_string(name, causal):
    check_flops_and_describe(name, causal)


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_spec_refuses_an_unknown_key_in_one_sentence(name):
    check_unknown_key_is_one_sentence(name)


@pytest.mark.parametrize("name, causal", cases())
def test_two_builds_with_the_same_seed_are_identical(name, causal):
    check_same_seed_builds_are_identical(name, causal)


# -- a mechanism registered here reaches every table with no other edit ------------------------------------
class ProbeSliding(Sliding):
    """A test-only mechanism: the sliding window under another name, with its own examples."""

    name = "test-contract-probe"
    examples = {"test": {"window": 2}, "bench": {"window": 16}}


@pytest.fixture()
def probe():
    """Register ProbeSliding for one test; the registry is exactly as before afterwards."""
    before = dict(MECHANISMS)
    register(ProbeSliding)
    try:
        yield ProbeSliding.name
    finally:
        MECHANISMS.pop(ProbeSliding.name, None)
        assert MECHANISMS == before


def test_a_mechanism_registered_in_a_test_is_in_the_contract_the_analysis_and_the_benchmark(probe):
    import test_analysis

    from longctx.bench.attention import DEFAULTS, _attention_spec, impls, useful_flops
    from longctx.bench.attention import build as bench_build
    name, impl = probe, f"longctx-{probe}"
    assert (name, False) in [p.values for p in cases()] and (name, True) in [p.values for p in cases()]
    for check in (check_forward_equals_reference, check_attention_map, check_flops_and_describe,
                  check_same_seed_builds_are_identical):
        check(name, False)
    check_unknown_key_is_one_sentence(name)
    assert test_analysis.model_level()[name] == {"type": name, "window": 2}
    test_analysis.test_output_attentions_times_v_is_what_each_layer_computed(name)
    cfg = dict(DEFAULTS, hidden=16, heads=2)
    assert impl in impls() and _attention_spec(impl, cfg) == (name, {"window": 16}, False)
    module, inputs, fn = bench_build(impl, 64, cfg, torch.float32)
    assert module.core.name == name and fn(*inputs).shape == (1, 64, 16)
    assert useful_flops(impl, 64, cfg)[0] > 0
