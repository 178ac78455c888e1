"""The engine against independent oracles: tensorly's dense tensors and dense matmuls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_vit
from oracle import dense_oracle, expected_target_delta
from tensorly.cp_tensor import cp_to_tensor

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


CP_WEIGHT_MODES = {
    "per-layer": ([], QKV),
    "depth+qkv+heads": (["depth", "qkv", "heads"], QKV),
    "depth*qkv*slices": (["depth*qkv*slices"], ALL),
}


@pytest.mark.parametrize("mode_set", sorted(CP_WEIGHT_MODES))
@pytest.mark.parametrize("weights", ["trainable", "fixed"])
def test_cp_weights_match_tensorly(weights, mode_set):
    """CP with λ (``factorization_options={"weights": ...}``): T = Σ_r λ_r Π_n A_n[:, r], checked
    against tensorly's cp_to_tensor((λ, factors)) built here, and both strategies = x ΔWᵀ."""
    modes, roles = CP_WEIGHT_MODES[mode_set]
    model, cfg = build("cp", modes, roles, "in_out", factorization_options={"weights": weights})
    am = ta.get_adapter_model(model, cfg)
    tensors = list(am.tensor_adapters.values())
    for t in tensors:
        assert torch.equal(t.weights, torch.ones(3, dtype=torch.float64))  # λ starts at ones
        is_param = "weights" in dict(t.named_parameters())
        assert is_param == (weights == "trainable")
        assert ("weights" in dict(t.named_buffers())) == (weights == "fixed")
    # ΔW = 0 at init with λ present too
    for name in am.adapted_layers:
        assert torch.count_nonzero(am.delta_weight(name)) == 0
    randomize(am)
    with torch.no_grad():  # distinct λ (a fixed λ is a buffer: set it as a loaded one would be)
        for t in tensors:
            t.weights.copy_(torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64))
    for t in tensors:
        factors = [getattr(t, f"factor_{a}").detach().numpy() for a in t.axes]
        want = cp_to_tensor((t.weights.detach().numpy(), factors))
        torch.testing.assert_close(t.reconstruct(), torch.from_numpy(want), rtol=0, atol=1e-10)
        unweighted = cp_to_tensor((np.ones(3), factors))
        assert not np.allclose(want, unweighted)  # λ really enters the product
    for row in ta.resolve_targets(tiny_vit(), cfg):
        start = {"q": 0, "k": 1, "v": 2}.get(row.role, 0) if row.module.endswith("qkv") else 0
        got = am.delta_weight(row.module)[start * row.shape[0] : (start + 1) * row.shape[0]]
        want = 0.5 * expected_target_delta(am, cfg, row, dim=16, layers=2)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for name, layer in am.adapted_layers.items():
        xin = torch.randn(5, layer.base_layer.in_features, dtype=torch.float64)
        want = xin @ am.delta_weight(name).T
        for strategy in ("contract", "materialise"):
            for p in layer.programs:
                p.strategy = strategy
            got = layer(xin) - layer.base_layer(xin)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # λ trains only when trainable; count_parameters agrees either way
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    am(x).square().sum().backward()
    for t in tensors:
        if weights == "trainable":
            assert t.weights.grad is not None and t.weights.grad.abs().sum() > 0
        else:
            assert t.weights.grad is None and not t.weights.requires_grad
    trainable = sum(p.numel() for p in am.tensor_adapters.parameters() if p.requires_grad)
    factor_count = sum(
        getattr(t, f"factor_{a}").numel() for t in tensors for a in t.axes
    )  # R · Σ_n n_n per tensor (+ R for a trainable λ)
    assert trainable == factor_count + (3 * len(tensors) if weights == "trainable" else 0)
    assert ta.count_parameters(tiny_vit(), cfg) == trainable
