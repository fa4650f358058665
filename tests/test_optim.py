"""The trainer's AdamW (longctx.train.optim): fused where the parameters' device allows, the same update."""
from __future__ import annotations

import torch

from longctx.train.optim import adamw, make_optimizer


def test_fused_adamw_matches_the_per_tensor_loop():
    torch.manual_seed(0)
    shapes = [(37, 11), (11,), (5, 3, 2)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    groups = lambda ps: [{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}]
    ours = adamw(groups(a), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    plain = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    assert ours.defaults["fused"] and not plain.defaults.get("fused")
    for step in range(6):
        g = [torch.randn(s, generator=torch.Generator().manual_seed(step * 10 + i)) for i, s in enumerate(shapes)]
        for ps, opt in ((a, ours), (b, plain)):
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_make_optimizer_groups_and_unfused_fallback():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = make_optimizer(model, {"train": {"lr": 1e-3, "weight_decay": 0.01}})
    assert opt.defaults["fused"]
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # the weight; bias, norm weight and bias
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not adamw(meta, lr=1e-3).defaults["fused"]  # a device the fused kernel does not take


def test_groups_given_as_generators_keep_their_parameters():
    model = torch.nn.Linear(3, 2)
    opt = adamw([{"params": model.parameters(), "weight_decay": 0.0}], lr=1e-3)
    assert len(opt.param_groups[0]["params"]) == 2
    assert len(adamw(model.parameters(), lr=1e-3).param_groups[0]["params"]) == 2
    assert len(adamw(model.weight, lr=1e-3).param_groups[0]["params"]) == 1


def test_a_resumed_optimizer_keeps_its_own_fused_choice():
    """An unfused (older) state loads into a fused optimizer: the groups stay fused, the state is the saved one."""
    from longctx.train.optim import keep_fused

    model = torch.nn.Linear(3, 2)
    old = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    old.step()
    new = adamw(model.parameters(), lr=1e-3)
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["fused"] is None  # what torch does: the saved group's setting
    keep_fused(new)
    assert new.param_groups[0]["fused"] is True
    torch.testing.assert_close(new.state[model.weight]["exp_avg"], old.state[model.weight]["exp_avg"])
    new.step()  # runs on the fused kernel with the loaded state
