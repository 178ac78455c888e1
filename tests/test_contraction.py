"""Plan cache behaviour, fused q/k/v in one contraction, and a property test over random
shapes, ranks (int and per-mode) and mode sets for every factorisation."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from families import make
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from oracle import dense_oracle, expected_target_delta

import tensadapt as ta
from tensadapt.contraction import PLAN_CACHE, plan_cache_info
from tensadapt.program import ContributionProgram


def test_plan_cache_plans_once_per_shape():
    model = tiny_vit(depth=3)
    cfg = ta.TensorAdapterConfig(
        factorization="tucker", modes=["depth", "qkv", "heads"], targets=["q", "k", "v"], rank=2
    )
    am = ta.get_adapter_model(model, cfg)
    ta.clear_plan_cache()
    x = torch.randn(2, 3, 16, 16)  # 2 images x (4 patches + cls) = 10 tokens
    am(x)
    first = plan_cache_info()
    assert first["built"] > 0
    keys_first = set(PLAN_CACHE._plans)
    for _ in range(3):
        am(x)
    again = plan_cache_info()
    assert again["built"] == first["built"]  # no re-planning at a fixed shape
    assert again["hits"] > first["hits"]
    # A new token count changes only the shape of x, so only the plans that take x are new:
    # one per distinct (contraction of x, factor shapes). The 3 blocks are identical (same
    # equation; the depth slice has the same shape), so exactly one new plan, for 15 tokens.
    programs = [p for layer in am.adapted_layers.values() for p in layer.programs]
    assert len(programs) == 3
    x_plans = {(p.contract_eq, tuple(tuple(f.shape) for f in p.operands())) for p in programs}
    assert len(x_plans) == 1
    x3 = torch.randn(3, 3, 16, 16)  # new token count (15): new plans, once
    am(x3)
    new_shape = plan_cache_info()
    assert new_shape["built"] - first["built"] == len(x_plans) == 1
    added = set(PLAN_CACHE._plans) - keys_first
    assert {(eq, (shapes[0], *shapes[1:])) for eq, shapes, _ in added} == {
        (eq, ((15, 16), *shapes)) for eq, shapes in x_plans
    }
    am(x3)
    am(x)
    assert plan_cache_info()["built"] == new_shape["built"]


FUSED = {"timm_vit": ("blocks.{}.attn.qkv", 16), "hf_gpt2": ("h.{}.attn.c_attn", 32)}


def fused_model(family, dim):
    """A 2-block model whose q/k/v live in one fused module of width ``dim``."""
    return tiny_vit(depth=2, dim=dim) if family == "timm_vit" else make(family)[0]


@pytest.mark.parametrize("family", sorted(FUSED))
def test_fused_qkv_is_one_contraction(family, monkeypatch):
    """A fused q/k/v module (timm attn.qkv, GPT-2 c_attn) with a ``qkv`` mode: q, k and v come
    from ONE contribution whose single contraction fills all 3·d output rows (DESIGN.md §3),
    for both strategies."""
    pattern, dim = FUSED[family]
    depth = 2
    model = fused_model(family, dim).double()
    cfg = ta.TensorAdapterConfig(
        factorization="cp",
        modes=["depth", "qkv"],
        targets=["q", "k", "v"],
        rank=3,
        scale=0.5,
        adapter_dtype="float64",
    )
    am = ta.get_adapter_model(model, cfg)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    contributions = am.resolution.layout.contributions
    for b in range(depth):
        name = pattern.format(b)
        layer = am.adapted_layers[name]
        assert len(layer.programs) == 1
        assert sum(c.module == name for c in contributions) == 1
        program = layer.programs[0]
        assert tuple(program.contribution.roles) == ("q", "k", "v")
        assert program.rows == 3 * dim and program.full
        # the one contribution's output is [Δq; Δk; Δv] by the documented layout
        rows = {r.role: r for r in am.resolution if r.module == name}
        want = torch.cat(
            [0.5 * expected_target_delta(am, cfg, rows[r], dim=dim, layers=depth) for r in "qkv"]
        )
        torch.testing.assert_close(am.delta_weight(name), want, rtol=0, atol=1e-10)
    # count the contractions run per forward of one fused module (outermost calls only: a
    # method that delegates to another still counts once)
    calls = {"low_rank": 0, "apply_x": 0, "delta": 0}
    active = [0]
    for method in calls:
        original = getattr(ContributionProgram, method)

        def counting(self, *args, _m=method, _f=original, **kwargs):
            calls[_m] += active[0] == 0
            active[0] += 1
            try:
                return _f(self, *args, **kwargs)
            finally:
                active[0] -= 1

        monkeypatch.setattr(ContributionProgram, method, counting)
    layer = am.adapted_layers[pattern.format(1)]
    x = torch.randn(7, dim, dtype=torch.float64)
    want = x @ am.delta_weight(pattern.format(1)).T
    for strategy in ("contract", "materialise"):
        layer.programs[0].strategy = strategy
        for k in calls:
            calls[k] = 0
        got = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        assert sum(calls.values()) == 1, (strategy, calls)
    # without a qkv mode the three roles are three tensors, hence three contributions
    per_role = ta.get_adapter_model(
        fused_model(family, dim),
        ta.TensorAdapterConfig(factorization="cp", modes=["depth"], targets=["q", "k", "v"]),
    )
    assert len(per_role.adapted_layers[pattern.format(0)].programs) == 3


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


FACTORIZATIONS = ["lora", "cp", "tucker", "tt"]


def rank_for(factorization, modes, per_mode, ranks):
    """An int rank, or for Tucker/TT with ``per_mode`` a per-mode mapping of ``ranks``.

    None of MODE_SETS names ``in``/``out``, so the tensor's axes are ``modes`` then ``in``,
    ``out`` (DESIGN.md §2). Tucker takes a rank per axis; TT one per bond, keyed by the axis
    before it (every axis but the last).
    """
    if per_mode and factorization in ("tucker", "tt"):
        axes = [*modes, "in", "out"]
        keys = axes if factorization == "tucker" else axes[:-1]
        return dict(zip(keys, ranks, strict=False))
    return ranks[0]


def check_rank_shapes(am, factorization, rank):
    """The per-mode ranks asked for are the ones the factors carry (not one shared int)."""
    if not isinstance(rank, dict):
        return
    for tensor in am.tensor_adapters.values():
        axes = list(tensor.axes)
        if factorization == "tucker":
            assert tuple(tensor.core.shape) == tuple(rank[a] for a in axes)
            for a in axes:
                assert getattr(tensor, f"factor_{a}").shape[1] == rank[a]
        else:
            bonds = [1] + [rank[a] for a in axes[:-1]] + [1]
            for n, a in enumerate(axes):
                core = getattr(tensor, f"core_{a}")
                assert (core.shape[0], core.shape[2]) == (bonds[n], bonds[n + 1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    factorization=st.sampled_from(FACTORIZATIONS),
    mode_index=st.integers(0, len(MODE_SETS) - 1),
    per_mode=st.booleans(),
    ranks=st.lists(st.integers(1, 4), min_size=5, max_size=5),
    dim_heads=st.sampled_from([(4, 1), (4, 2), (6, 3), (8, 2), (8, 4), (12, 3)]),
    depth=st.integers(1, 3),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
# always run: lora, and per-mode Tucker / TT ranks (distinct, some above their mode's size)
@example("lora", 0, False, [3, 1, 1, 1, 1], (8, 2), 2, 5, 0)
@example("tucker", 4, True, [2, 3, 4, 1, 2], (8, 4), 3, 4, 1)
@example("tt", 7, True, [4, 1, 3, 2, 2], (4, 2), 2, 3, 2)
@example("tt", 5, True, [1, 4, 2, 3, 2], (6, 3), 3, 6, 3)
def test_property_random_shapes(
    factorization, mode_index, per_mode, ranks, dim_heads, depth, tokens, seed
):
    if factorization == "lora":
        mode_index = 0  # lora is order 2: it pairs with the per-layer tensorisation only
    modes, roles = MODE_SETS[mode_index]
    rank = rank_for(factorization, modes, per_mode, ranks)
    dim, heads = dim_heads
    torch.manual_seed(seed)
    model = tiny_vit(depth=depth, dim=dim, heads=heads).double()
    alpha = 2.0
    cfg = ta.TensorAdapterConfig(
        factorization=factorization,
        modes=modes,
        targets=roles,
        rank=rank,
        adapter_dtype="float64",
        alpha=alpha,
    )
    am = ta.get_adapter_model(model, cfg)
    check_rank_shapes(am, factorization, rank)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    for tensor in am.tensor_adapters.values():
        torch.testing.assert_close(tensor.reconstruct(), dense_oracle(tensor), rtol=0, atol=1e-10)
    # PEFT convention s = alpha / rank; for per-mode ranks the largest one (config.py)
    s = alpha / (max(rank.values()) if isinstance(rank, dict) else rank)
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
