"""The caching CPU allocator (longctx.cpu_cache): a freed block of 1 MB or more serves the next request of
its size class (the same memory, no fresh pages), the bytes held free never exceed the cap, a request that
misses first gives back free blocks of other classes (so in use + held free stays within the peak use),
turning it off
gives the blocks back, and training through it is bit-identical to training without it, on every pass
(a reused block holds the previous step's data: an operator that read memory it had not written would
show here). Each check runs in its own process, so this test process keeps PyTorch's allocator."""
import json
import subprocess
import sys
import textwrap

import pytest

from longctx import cpu_cache
from longctx.errors import LongctxError


pytestmark = pytest.mark.usefixtures("cpp_extension")  # built once (tests/conftest.py)


def _run(code: str, **env) -> dict:
    import os
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_blocks_serve_the_next_request_and_the_cap_holds():
    r = _run("""
        import json, torch
        from longctx import cpu_cache
        assert cpu_cache.enable(8 << 20)
        s0 = cpu_cache.stats()
        x = torch.empty(3 << 20, dtype=torch.uint8); p = x.data_ptr(); del x
        y = torch.empty((3 << 20) - 100, dtype=torch.uint8)  # same 64 KB class
        same = y.data_ptr() == p
        s1 = cpu_cache.stats()
        small = [torch.empty(1000) for _ in range(10)]; del small  # below 1 MB: not cached
        s2 = cpu_cache.stats()
        big = [torch.empty(3 << 20, dtype=torch.uint8) for _ in range(4)]; del big  # 12 MB freed, cap 8 MB
        s3 = cpu_cache.stats()
        del y
        z = torch.empty(3 << 20, dtype=torch.uint8)  # handed out while on, freed after off
        cpu_cache.disable()
        s4 = cpu_cache.stats()
        del z
        s5 = cpu_cache.stats()
        print(json.dumps(dict(same=same, s0=s0, s1=s1, s2=s2, s3=s3, s4=s4, s5=s5)))
    """)
    assert r["same"], "a freed block was not handed out again"
    assert r["s1"]["hits"] - r["s0"]["hits"] == 1 and r["s1"]["misses"] - r["s0"]["misses"] == 1
    assert r["s2"]["hits"] == r["s1"]["hits"] and r["s2"]["misses"] == r["s1"]["misses"]
    block = 3 << 20  # a multiple of 64 KB: its own class
    assert r["s3"]["cached_bytes"] == 2 * block <= 8 << 20  # two fit under the cap, the others went back
    assert r["s3"]["peak_cached_bytes"] <= 8 << 20
    assert r["s4"]["enabled"] == 0 and r["s4"]["cached_bytes"] == 0
    assert r["s5"]["cached_bytes"] == 0 and r["s5"]["in_use_bytes"] == 0


def test_a_miss_gives_back_other_classes_so_the_process_stays_within_its_peak_use():
    r = _run("""
        import json, torch
        from longctx import cpu_cache
        assert cpu_cache.enable(1 << 30)
        a = [torch.empty(3 << 20, dtype=torch.uint8) for _ in range(3)]
        del a  # 9 MB held free in the 3 MB class
        s0 = cpu_cache.stats()
        b = torch.empty(5 << 20, dtype=torch.uint8)  # a miss: at least 5 MB of free blocks go back first
        s1 = cpu_cache.stats()
        print(json.dumps(dict(s0=s0, s1=s1)))
    """)
    s0, s1 = r["s0"], r["s1"]
    assert s0["cached_bytes"] == 9 << 20
    assert s1["misses"] == s0["misses"] + 1 and s1["cached_bytes"] == 3 << 20  # the two oldest went back
    assert s1["cached_bytes"] + s1["in_use_bytes"] <= s1["peak_in_use_bytes"]


@pytest.mark.slow
def test_training_through_the_cache_is_bit_identical():
    code = """
        import json, os, torch
        from longctx import cpu_cache
        from longctx.models import LongctxConfig, LongctxForQuestionAnswering
        if os.environ["CACHE"] == "1":
            assert cpu_cache.enable(1 << 30)
        torch.set_num_threads(2)
        out = {}
        for name, att in [("sliding", {"attention": "sliding", "window": 16}),
                          ("bigbird", {"attention": {"type": "bigbird", "block": 16, "random": 2, "global_blocks": 1}}),
                          ("linformer", {"attention": {"type": "linformer", "k": 32}}),
                          ("performer", {"attention": {"type": "performer", "nb_features": 32}}),
                          ("nystrom", {"attention": {"type": "nystrom", "num_landmarks": 16, "conv_kernel_size": 3}}),
                          ("lsh", {"attention": {"type": "lsh", "chunk_length": 32, "num_buckets": 8, "n_hashes": 2}})]:
            torch.manual_seed(0)
            cfg = LongctxConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=128, max_position_embeddings=512, hidden_dropout_prob=0.0, **att)
            model = LongctxForQuestionAnswering(cfg)
            B, n = 8, 512  # activations of 1-4 MB: cached blocks
            ids = torch.randint(5, 300, (B, n))
            mask = torch.ones(B, n, dtype=torch.long)
            mask[1, 400:] = 0
            glob = torch.zeros(B, n, dtype=torch.long)
            if name in ("sliding", "bigbird"):
                glob[:, :5] = 1  # a question at the start (the approximate families take no global tokens)
            batch = dict(input_ids=ids, attention_mask=mask, global_attention_mask=glob,
                         start_positions=torch.randint(5, 20, (B,)), end_positions=torch.randint(20, 30, (B,)))
            sums = []
            for _ in range(3):  # later passes get blocks holding the earlier passes' data
                model.zero_grad()
                loss = model(**batch).loss
                loss.backward()
                sums.append([loss.item()] + [float(p.grad.double().sum()) for p in model.parameters() if p.grad is not None])
            out[name] = sums
        out["stats"] = cpu_cache.stats()
        print(json.dumps(out))
    """
    plain = _run(code, CACHE="0")
    cached = _run(code, CACHE="1")
    assert cached["stats"]["hits"] > 100 and plain["stats"]["enabled"] == 0
    for name in plain:
        if name == "stats":
            continue
        assert cached[name] == plain[name], name
        assert cached[name][0] == cached[name][2], name


def test_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("LONGCTX_CPU_CACHE_MB", "0")
    assert cpu_cache.default_cap() == 0 and cpu_cache.setup() == "off"
    monkeypatch.setenv("LONGCTX_CPU_CACHE_MB", "512")
    assert cpu_cache.default_cap() == 512 << 20
    for bad in ("lots", "-1"):
        monkeypatch.setenv("LONGCTX_CPU_CACHE_MB", bad)
        with pytest.raises(LongctxError, match="LONGCTX_CPU_CACHE_MB"):
            cpu_cache.default_cap()
    monkeypatch.delenv("LONGCTX_CPU_CACHE_MB")
    assert 0 < cpu_cache.default_cap() == cpu_cache._mem_total() // 4
