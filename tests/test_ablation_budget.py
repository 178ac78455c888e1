"""``solve_ranks``: budgets from 5k to 500k on ViT-B/16 shapes (meta device), isorank."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tensadapt as ta
from tensadapt.errors import ConfigError
from tensadapt.rank_solver import apply_rank, free_ranks, solve_ranks

BUDGETS = [5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000]

# every factorisation with several mode sets; all ranks free
PER_MODE = {
    "cp depth,qkv,heads": dict(factorization="cp", modes=["depth", "qkv", "heads"],
                               targets=["q", "k", "v"]),
    "cp depth,qkv": dict(factorization="cp", modes=["depth", "qkv"], targets=["q", "k", "v"]),
    "cp depth*qkv*slices": dict(factorization="cp", modes=["depth*qkv*slices"], targets=["all"],
                                orientation="residual"),
    "cp weights": dict(factorization="cp", modes=["depth", "qkv"], targets=["q", "k", "v"],
                             factorization_options={"weights": "trainable"}),
    "tucker depth,qkv": dict(factorization="tucker", modes=["depth", "qkv"],
                             targets=["q", "k", "v"]),
    "tucker depth,qkv,heads": dict(factorization="tucker", modes=["depth", "qkv", "heads"],
                                   targets=["q", "k", "v"]),
    "tucker profile": dict(factorization="tucker", modes=["depth", "qkv"], targets=["q", "k", "v"],
                           rank={"depth": 2, "qkv": 1, "in": 4, "out": 4}),
    "tt depth,qkv": dict(factorization="tt", modes=["depth", "qkv"], targets=["q", "k", "v"]),
    "tt depth,qkv,heads": dict(factorization="tt", modes=["depth", "qkv", "heads"],
                               targets=["q", "k", "v"]),
    "tt depth*qkv*slices": dict(factorization="tt", modes=["depth*qkv*slices"], targets=["all"],
                                orientation="residual"),
    "two groups (cara-like)": dict(
        factorization="cp",
        groups=[dict(targets=["q", "k", "v"], modes=["depth*qkv", "heads"]),
                dict(targets=["o", "fc1", "fc2"], modes=["depth*qkv*slices"],
                     orientation="residual")],
    ),
}  # fmt: skip
# one tensor per target: the rank moves the count in coarse steps (36,864 for q,v of ViT-B)
PER_LAYER = {
    "lora q,v": dict(factorization="lora", targets=["q", "v"]),
    "lora all": dict(factorization="lora", targets=["all"]),
    "cp per-layer": dict(factorization="cp", targets=["q", "v"]),
    "tt per-layer": dict(factorization="tt", targets=["q", "v"]),
}


@pytest.fixture(scope="module")
def vit_b():
    import timm

    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False)


@pytest.mark.parametrize("name", list(PER_MODE))
def test_lands_within_10_percent(vit_b, name):
    cfg = ta.TensorAdapterConfig(**PER_MODE[name])
    for budget in BUDGETS:
        sol = solve_ranks(vit_b, cfg, budget)
        assert sol.params == ta.count_parameters(vit_b, sol.config)  # exact, reported
        assert abs(sol.params - budget) <= 0.10 * budget, (name, budget, sol.params, sol.ranks)
        assert sol.budget == budget and sol.rel_error == (sol.params - budget) / budget


@pytest.mark.parametrize("name", list(PER_LAYER))
def test_per_layer_is_as_close_as_the_structure_allows(vit_b, name):
    """One int rank: the solver's count is the closest over every rank 1..R (brute force);
    within 10% wherever the rank step allows it."""
    cfg = ta.TensorAdapterConfig(**PER_LAYER[name])
    counts = [
        ta.count_parameters(vit_b, ta.TensorAdapterConfig(**{**PER_LAYER[name], "rank": r}))
        for r in range(1, 40)
    ]
    for budget in BUDGETS:
        sol = solve_ranks(vit_b, cfg, budget)
        best = min(abs(c - budget) for c in counts)
        assert abs(sol.params - budget) == best, (name, budget, sol.params)
        step = counts[0]
        if budget >= 5 * step:
            assert abs(sol.params - budget) <= 0.10 * budget


def test_per_mode_ranks_and_caps(vit_b):
    cfg = ta.TensorAdapterConfig(**PER_MODE["tucker depth,qkv,heads"])
    sol = solve_ranks(vit_b, cfg, 200_000)
    (rank,) = sol.ranks
    assert rank["depth"] <= 12 and rank["qkv"] <= 3 and rank["heads"] <= 12
    assert max(rank.values()) - min(v for k, v in rank.items() if k in ("in", "out")) <= 1
    # a per-mode profile is kept (in/out 4x the qkv rank, qkv capped at 3)
    prof = solve_ranks(vit_b, ta.TensorAdapterConfig(**PER_MODE["tucker profile"]), 50_000)
    r = prof.ranks[0]
    assert r["qkv"] <= 3 and r["in"] >= 4 * min(r["qkv"], 3) - 4
    # fixed modes keep their rank
    fixed = solve_ranks(vit_b, cfg.__class__(**{**PER_MODE["tucker depth,qkv,heads"], "rank": 2}),
                        100_000, fixed_modes=["depth"])  # fmt: skip
    assert fixed.ranks[0]["depth"] == 2
    caps = free_ranks(vit_b, cfg)
    assert caps[0]["qkv"] == 3 and caps[0]["in"] == 768 and caps[0]["out"] == 64


def test_groups_selection_and_alpha(vit_b):
    cfg = ta.TensorAdapterConfig(**{**PER_MODE["two groups (cara-like)"], "alpha": 16})
    sol = solve_ranks(vit_b, cfg, 30_000, groups=[1])
    assert sol.config.groups[0].rank == 8  # untouched
    assert abs(sol.rel_error) < 0.1
    assert sol.config.groups[1].effective_scale() == 16 / sol.config.groups[1].rank


def test_budget_extremes_and_errors(vit_b):
    lora = ta.TensorAdapterConfig(factorization="lora", targets=["q", "v"])
    low = solve_ranks(vit_b, lora, 10)
    assert low.ranks == [1] and low.rel_error > 0  # the smallest the structure allows
    tk = ta.TensorAdapterConfig(factorization="tucker", modes=["qkv"], targets=["q", "k", "v"])
    high = solve_ranks(vit_b, tk, 10**12)
    assert high.ranks == [{"qkv": 3, "in": 768, "out": 768}]  # every rank at its cap
    with pytest.raises(ConfigError, match="budget must be a positive int"):
        solve_ranks(vit_b, lora, 0)
    with pytest.raises(ConfigError, match="no free rank"):
        solve_ranks(vit_b, lora, 1000, groups=[])


def test_isorank(vit_b):
    tk = ta.TensorAdapterConfig(**PER_MODE["tucker depth,qkv,heads"])
    sol = apply_rank(vit_b, tk, 16)
    assert sol.ranks == [{"depth": 12, "qkv": 3, "heads": 12, "in": 16, "out": 16}]
    assert sol.params == ta.count_parameters(vit_b, sol.config) and sol.budget is None
    assert apply_rank(vit_b, tk, 16, cap=False).ranks == [16]
    cp = apply_rank(vit_b, ta.TensorAdapterConfig(**PER_MODE["cp depth,qkv"]), 5)
    assert cp.ranks == [5]


@pytest.mark.skipif(
    importlib.util.find_spec("tensadapt.presets") is None,
    reason="tensadapt.presets is not available yet",
)
def test_every_preset(vit_b):
    from tensadapt import presets

    configs = []
    for name in presets.list():
        if name == "tenslora":
            for variant in ("att", "qkv", "depth", "att_qkv", "att_depth", "qkv_depth",
                            "att_qkv_depth"):  # fmt: skip
                for fact in ("tucker", "cp"):
                    cfg = presets.get(name, variant=variant, factorization=fact)
                    configs.append((f"tenslora-{variant}-{fact}", cfg))
        else:
            configs.append((name, presets.get(name)))
    failures = []
    for name, cfg in configs:
        smallest = apply_rank(vit_b, cfg, 1).params
        uniform = [apply_rank(vit_b, cfg, r).params for r in range(1, 48)]
        for budget in BUDGETS:
            sol = solve_ranks(vit_b, cfg, budget)
            assert sol.params == ta.count_parameters(vit_b, sol.config)
            if abs(sol.rel_error) <= 0.10:
                continue
            # coarse structure (e.g. one tensor per layer): no worse than any common rank
            best_uniform = min(abs(c - budget) for c in uniform)
            if budget < 5 * smallest and abs(sol.params - budget) <= best_uniform:
                continue
            failures.append((name, budget, sol.params, sol.ranks))
    assert not failures, failures
