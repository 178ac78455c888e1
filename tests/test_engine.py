"""The engine against independent oracles: tensorly's dense tensors and dense matmuls."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from oracle import dense_oracle, expected_target_delta

import tensadapt as ta

QKV = ["q", "k", "v"]
ALL = ["q", "k", "v", "o", "fc1", "fc2"]
MODE_SETS = {
    "per-layer": ([], QKV, "in_out"),
    "qkv": (["qkv"], QKV, "in_out"),
    "depth": (["depth"], QKV, "in_out"),
    "heads": (["heads"], QKV, "in_out"),
    "heads-with-o": (["heads"], ["q", "k", "v", "o"], "in_out"),
    "depth+qkv": (["depth", "qkv"], QKV, "in_out"),
    "depth+qkv+heads": (["depth", "qkv", "heads"], QKV, "in_out"),
    "depth*qkv+heads": (["depth*qkv", "heads"], QKV, "in_out"),
    "slices": (["slices"], ["fc1", "fc2"], "in_out"),
    "depth*qkv*slices": (["depth*qkv*slices"], ALL, "in_out"),
    "residual-slices": (["depth*qkv*slices"], ["o", "fc1", "fc2"], "residual"),
    "ordered-axes": (["depth*qkv", "in", "heads", "out"], QKV, "in_out"),
}
CASES = [("lora", "per-layer")] + [(f, m) for f in ("cp", "tucker", "tt") for m in MODE_SETS]


def build(factorization, modes, roles, orientation, **kw):
    torch.manual_seed(0)
    model = tiny_vit().double().eval()
    rank = 2 if factorization == "tucker" else 3
    cfg = ta.TensorAdapterConfig(
        factorization=factorization,
        modes=modes,
        targets=roles,
        rank=rank,
        scale=0.5,
        orientation=orientation,
        adapter_dtype="float64",
        **kw,
    )
    return model, cfg


def randomize(am):
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()


@pytest.mark.parametrize("factorization,mode_set", CASES)
def test_dense_and_strategies_match_oracle(factorization, mode_set):
    modes, roles, orientation = MODE_SETS[mode_set]
    model, cfg = build(factorization, modes, roles, orientation)
    am = ta.get_adapter_model(model, cfg)
    randomize(am)
    # 1. reconstruction == tensorly on the same factors
    for tensor in am.tensor_adapters.values():
        torch.testing.assert_close(tensor.reconstruct(), dense_oracle(tensor), rtol=0, atol=1e-10)
    # 2. every target's ΔW (scale included) == the oracle tensor at its coordinates
    for row in ta.resolve_targets(tiny_vit(), cfg):
        layer = am.adapted_layers[row.module]
        base_rows = {"q": 0, "k": 1, "v": 2}.get(row.role, 0) if row.module.endswith("qkv") else 0
        start = base_rows * row.shape[0]
        got = am.delta_weight(row.module)[start : start + row.shape[0]]
        want = 0.5 * expected_target_delta(am, cfg, row, dim=16, layers=2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        del layer
    # 3. both strategies give x @ ΔWᵀ
    x = torch.randn(7, 16, dtype=torch.float64)
    for name, layer in am.adapted_layers.items():
        xin = torch.randn(7, layer.base_layer.in_features, dtype=torch.float64)
        want = xin @ am.delta_weight(name).T
        for strategy in ("contract", "materialise"):
            for p in layer.programs:
                p.strategy = strategy
            got = layer(xin) - layer.base_layer(xin)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    del x
    # 4. exact count, nothing allocated
    trainable = sum(p.numel() for p in am.tensor_adapters.parameters() if p.requires_grad)
    assert ta.count_parameters(tiny_vit(), cfg) == trainable


@pytest.mark.parametrize("factorization,mode_set", CASES)
def test_noop_at_init_and_gradients(factorization, mode_set):
    modes, roles, orientation = MODE_SETS[mode_set]
    model, cfg = build(factorization, modes, roles, orientation)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    base = model(x)
    am = ta.get_adapter_model(model, cfg)
    out = am(x)
    assert torch.equal(out, base)
    out.square().sum().backward()
    for tensor in am.tensor_adapters.values():
        zero = getattr(tensor, tensor.zero_term)
        assert torch.count_nonzero(zero) == 0
        assert zero.grad is not None and zero.grad.abs().sum() > 0, tensor.zero_term
    # with every factor non-zero, every trainable factor gets a gradient
    randomize(am)
    am.zero_grad()
    am(x).square().sum().backward()
    for name, p in am.tensor_adapters.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # base stays frozen; only adapters and the head train
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    assert all(n.startswith(("tensor_adapters.", "base_model.head.")) for n in trainable)


def test_disable_adapter_gives_base(vit):
    x = torch.randn(2, 3, 16, 16)
    base = vit(x)
    am = ta.get_adapter_model(
        vit, ta.TensorAdapterConfig(factorization="cp", modes=["depth", "qkv"], targets=QKV, rank=4)
    )
    randomize(am)
    assert not torch.allclose(am(x), base)
    with am.disable_adapter():
        assert torch.equal(am(x), base)
    assert not torch.allclose(am(x), base)


def test_strategy_auto_follows_planned_flops():
    model, cfg = build("cp", ["depth", "qkv", "heads"], QKV, "in_out")
    am = ta.get_adapter_model(model, cfg)
    program = am.adapted_layers["blocks.0.attn.qkv"].programs[0]
    factors = program.operands()
    # few tokens: contracting x with the rank-3 factors is cheaper than building a 48x16 ΔW
    assert program.use_contract(1, factors)
    # the materialised product costs the same for any N; contract grows with N·rank·…
    big = 10**6
    from tensadapt.contraction import PLAN_CACHE

    c = PLAN_CACHE.get(
        program.contract_eq, ((big, 16), *(tuple(f.shape) for f in factors)), torch.float64
    ).flops
    m = (
        PLAN_CACHE.get(
            program.materialise_eq, tuple(tuple(f.shape) for f in factors), torch.float64
        ).flops
        + 2 * big * program.rows * 16
    )
    assert program.use_contract(big, factors) == (c <= m)
