"""Plan cache behaviour and a property test over random shapes, ranks and mode sets."""

from __future__ import annotations

import torch
from conftest import tiny_vit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import dense_oracle, expected_target_delta

import tensadapt as ta
from tensadapt.contraction import plan_cache_info


def test_plan_cache_plans_once_per_shape():
    model = tiny_vit(depth=3)
    cfg = ta.TensorAdapterConfig(
        factorization="tucker", modes=["depth", "qkv", "heads"], targets=["q", "k", "v"], rank=2
    )
    am = ta.get_adapter_model(model, cfg)
    ta.clear_plan_cache()
    x = torch.randn(2, 3, 16, 16)
    am(x)
    first = plan_cache_info()
    assert first["built"] > 0
    for _ in range(3):
        am(x)
    again = plan_cache_info()
    assert again["built"] == first["built"]  # no re-planning at a fixed shape
    assert again["hits"] > first["hits"]
    x3 = torch.randn(3, 3, 16, 16)  # new token count: new plans, once
    am(x3)
    new_shape = plan_cache_info()
    assert new_shape["built"] > first["built"]
    am(x3)
    am(x)
    assert plan_cache_info()["built"] == new_shape["built"]


def test_identical_layers_share_plans():
    model = tiny_vit(depth=4)
    cfg = ta.TensorAdapterConfig(
        factorization="cp",
        modes=["depth", "qkv"],
        targets=["q", "k", "v"],
        rank=2,
        strategy="contract",
    )
    am = ta.get_adapter_model(model, cfg)
    ta.clear_plan_cache()
    am(torch.randn(1, 3, 16, 16))
    # 4 blocks, one contraction each, one shape: a single plan serves all of them
    assert plan_cache_info()["built"] == 1


MODE_SETS = [
    ([], ["q", "v"]),
    (["qkv"], ["q", "k", "v"]),
    (["depth"], ["q", "k", "v"]),
    (["heads"], ["q", "k", "v", "o"]),
    (["depth", "qkv", "heads"], ["q", "k", "v"]),
    (["heads", "depth*qkv"], ["q", "k", "v"]),
    (["slices"], ["fc1", "fc2"]),
    (["depth*qkv*slices"], ["q", "k", "v", "o", "fc1", "fc2"]),
]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    factorization=st.sampled_from(["cp", "tucker", "tt"]),
    mode_index=st.integers(0, len(MODE_SETS) - 1),
    dim_heads=st.sampled_from([(4, 1), (4, 2), (6, 3), (8, 2), (8, 4), (12, 3)]),
    depth=st.integers(1, 3),
    rank=st.integers(1, 4),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(factorization, mode_index, dim_heads, depth, rank, tokens, seed):
    modes, roles = MODE_SETS[mode_index]
    dim, heads = dim_heads
    torch.manual_seed(seed)
    model = tiny_vit(depth=depth, dim=dim, heads=heads).double()
    cfg = ta.TensorAdapterConfig(
        factorization=factorization,
        modes=modes,
        targets=roles,
        rank=rank,
        adapter_dtype="float64",
        alpha=2.0,
    )
    am = ta.get_adapter_model(model, cfg)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    for tensor in am.tensor_adapters.values():
        torch.testing.assert_close(tensor.reconstruct(), dense_oracle(tensor), rtol=0, atol=1e-10)
    s = cfg.effective_scale()
    for row in am.resolution:
        fused_row = {"q": 0, "k": 1, "v": 2}[row.role] if row.module.endswith("qkv") else 0
        got = am.delta_weight(row.module)[fused_row * dim : fused_row * dim + row.shape[0]]
        want = s * expected_target_delta(am, cfg, row, dim=dim, layers=depth)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    for name, layer in am.adapted_layers.items():
        x = torch.randn(tokens, layer.base_layer.in_features, dtype=torch.float64)
        want = x @ am.delta_weight(name).T
        for strategy in ("contract", "materialise"):
            for p in layer.programs:
                p.strategy = strategy
            torch.testing.assert_close(layer(x) - layer.base_layer(x), want, rtol=0, atol=1e-10)
    assert ta.count_parameters(tiny_vit(depth=depth, dim=dim, heads=heads), cfg) == sum(
        p.numel() for p in am.tensor_adapters.parameters() if p.requires_grad
    )
