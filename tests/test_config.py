"""Config validation, JSON round trip and the open registries."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_vit

import tensadapt as ta
from tensadapt.errors import ConfigError, ModeError, UnknownNameError


@pytest.mark.parametrize(
    "fields, needles",
    [
        (dict(factorization="cpd"), ["'cpd'", "cp", "lora", "tt", "tucker"]),
        (dict(factorization="cp", modes=["dept"]), ["'dept'", "depth", "qkv", "slices"]),
        (dict(factorization="cp", modes=["depth*qkvv"]), ["'qkvv'", "qkv"]),
        (dict(rank=0), ["rank", "0", "positive int"]),
        (dict(rank=-3), ["-3", "positive int"]),
        (dict(rank=2.5), ["2.5", "positive int"]),
        (dict(rank="8"), ["'8'", "positive int"]),
        (dict(rank=True), ["True", "positive int"]),
        (
            dict(
                factorization="tucker",
                modes=["depth"],
                rank={"heads": 2, "depth": 2, "in": 2, "out": 2},
            ),
            ["heads", "does not have", "depth", "in", "out"],
        ),
        (
            dict(factorization="tucker", modes=["depth"], rank={"depth": 2}),
            ["no rank for", "in", "out"],
        ),
        (dict(factorization="cp", rank={"in": 2, "out": 2}), ["cp takes one int rank"]),
        (dict(factorization="cp", modes=["depth", "depth"]), ["'depth' appears twice"]),
        (dict(factorization="cp", modes=["depth*qkv", "qkv"]), ["'qkv' appears twice"]),
        (dict(factorization="lora", modes=["depth"]), ["per-layer", "'depth'", "cp", "tucker"]),
        (dict(targets=["query"]), ["'query'", "q, k, v", "attn"]),
        (dict(targets=[]), ["targets is empty"]),
        (dict(alpha=16, scale=2.0), ["alpha", "scale", "not both"]),
        (dict(dropout=1.5), ["dropout", "1.5"]),
        (dict(orientation="rows"), ["'rows'", "in_out", "residual"]),
        (dict(composition="parallel"), ["'parallel'", "additive", "serial"]),
        (dict(strategy="fast"), ["'fast'", "auto", "contract", "materialise"]),
        (
            dict(factorization="cp", factorization_options={"weights": "yes"}),
            ["weights", "'yes'", "trainable", "fixed", "none"],
        ),
        (dict(factorization="cp", factorization_options={"lam": 1}), ["'lam'", "weights"]),
        (dict(init={"zero": "in", "method": "gaussian"}), ["'gaussian'", "orthogonal"]),
        (dict(factorization="cp", modes=["heads*depth"]), ["feature mode", "structural"]),
        (dict(groups=[{"targets": ["q"], "rank": -1}]), ["groups[0]", "-1"]),
        (dict(groups=[{"tragets": ["q"]}]), ["groups[0]", "'tragets'", "targets"]),
    ],
)
def test_bad_configs_fail_at_construction(fields, needles):
    with pytest.raises(ConfigError) as err:
        ta.TensorAdapterConfig(**fields)
    message = str(err.value)
    for needle in needles:
        assert needle in message, (needle, message)


def test_unknown_name_is_a_key_error_listing_choices():
    with pytest.raises(KeyError) as err:
        ta.TensorAdapterConfig(factorization="svd")
    assert isinstance(err.value, UnknownNameError)
    assert "valid factorizations are: cp, lora, tt, tucker" in str(err.value)


def test_heads_that_do_not_divide_width_fail_before_the_model_changes():
    model = tiny_vit(dim=18, heads=3)
    cfg = ta.TensorAdapterConfig(factorization="cp", modes=["heads"], targets=["q"], num_heads=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModeError, match=r"heads=4 does not divide the attention width 18"):
        ta.get_adapter_model(model, cfg)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, ta.TensorAdapterLayer) for m in model.modules())


def test_heads_on_mlp_roles_is_rejected():
    cfg = ta.TensorAdapterConfig(factorization="cp", modes=["heads"], targets=["q", "fc1"])
    with pytest.raises(ModeError, match="attention roles"):
        ta.resolve_targets(tiny_vit(), cfg)


def test_json_round_trip_with_groups():
    cfg = ta.TensorAdapterConfig(
        factorization="cp",
        modes=["depth*qkv", "in", "heads", "out"],
        rank=4,
        scale=2.0,
        groups=[
            {"targets": ["q", "k", "v"], "factorization_options": {"weights": "trainable"}},
            {
                "targets": ["o", "fc1", "fc2"],
                "modes": ["depth*qkv*slices"],
                "orientation": "residual",
                "factorization": "tucker",
                "rank": {"depth*qkv*slices": 2, "in": 3, "out": 3},
            },
        ],
    )
    text = cfg.to_json()
    again = ta.TensorAdapterConfig.from_json(text)
    assert again == cfg
    assert json.loads(again.to_json()) == json.loads(text)
    assert again.groups[0].modes == cfg.modes  # inherited
    assert again.groups[1].rank == {"depth*qkv*slices": 2, "in": 3, "out": 3}
    groups = again.resolved_groups()
    assert [g.factorization for g in groups] == ["cp", "tucker"]


def test_alpha_over_rank_scale():
    assert ta.TensorAdapterConfig(rank=8, alpha=16).effective_scale() == 2.0
    assert ta.TensorAdapterConfig(rank=8).effective_scale() == 1.0
    assert ta.TensorAdapterConfig(rank=8, scale=0.1).effective_scale() == 0.1


def test_registries_accept_user_classes():
    assert set(ta.list_factorizations()) >= {"lora", "cp", "tucker", "tt"}
    assert set(ta.list_modes()) >= {"in", "out", "heads", "qkv", "depth", "slices"}

    @ta.register_mode("parity", overwrite=True)
    class Parity(ta.StructuralMode):
        """Even and odd blocks share a coordinate."""

        covers = frozenset({"layer"})

        def key(self, piece):
            return piece.layer % 2

    @ta.register_factorization("rank1_outer", overwrite=True)
    class Outer(ta.CP):
        """A rank-1 CP that ignores the requested rank."""

        @classmethod
        def normalize_rank(cls, axes, rank):
            return 1

    model = tiny_vit(depth=4)
    cfg = ta.TensorAdapterConfig(
        factorization="rank1_outer", modes=["parity", "qkv"], rank=5, targets=["q", "k", "v"]
    )
    res = ta.resolve_targets(model, cfg)
    (spec,) = res.layout.tensors.values()
    assert spec.shape == (2, 3, 16, 16)
    assert [r.coordinates["parity"][0] for r in res if r.role == "q"] == [0, 1, 0, 1]
    assert ta.count_parameters(model, cfg) == 2 + 3 + 16 + 16
    # the class itself is accepted too, and JSON writes its registered name
    cfg2 = ta.TensorAdapterConfig(factorization=Outer, modes=["parity"], targets=["q"])
    assert cfg2.to_dict()["factorization"] == "rank1_outer"
    am = ta.get_adapter_model(model, cfg2)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        with am.disable_adapter():
            base = am(x)
        assert torch.equal(am(x), base)
