"""Published methods as presets: exact parameter counts, no-op at init, training, names."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import assert_noop_then_trains, tiny_vit
from families import make

import tensadapt as ta
from tensadapt import presets
from tensadapt.errors import ConfigError, ModeError, TargetResolutionError

D, L, H, DH = 768, 12, 12, 64
TENSLORA = {
    "att": lambda r: 3 * L * (r * D + r * DH + r * H + r**3),
    "qkv": lambda r: L * (2 * r * D + 3 * r + r**3),
    "depth": lambda r: 3 * (2 * r * D + r * L + r**3),
    "att_qkv": lambda r: L * (r * D + r * DH + r * H + 3 * r + r**4),
    "att_depth": lambda r: 3 * (r * D + r * DH + r * H + r * L + r**4),
    "qkv_depth": lambda r: 2 * r * D + 3 * r + r * L + r**4,
    "att_qkv_depth": lambda r: r * D + r * DH + r * H + 3 * r + r * L + r**5,
}
# CP (TensLoRA's alternative): R·(sum of the mode sizes) per tensor, times the number of
# tensors; the weights are fixed ones (a buffer), so they are not counted.
TENSLORA_CP = {
    "att": lambda r: 3 * L * r * (D + DH + H),
    "qkv": lambda r: L * r * (2 * D + 3),
    "depth": lambda r: 3 * r * (2 * D + L),
    "att_qkv": lambda r: L * r * (D + DH + H + 3),
    "att_depth": lambda r: 3 * r * (D + DH + H + L),
    "qkv_depth": lambda r: r * (2 * D + 3 + L),
    "att_qkv_depth": lambda r: r * (D + DH + H + 3 + L),
}
# CaRA's mode-count ablation: only the q/k/v tensor changes; the o+MLP tensor
# (9L, d, d) keeps R·(9L + 2d) + R (λ), and the three shared biases add 768 + 3072 + 768.
CARA_QKV_SIZES = {
    4: 3 * L + D + H + DH,  # (3L, d, H, d_h), the default
    5: L + 3 + D + H + DH,  # (L, 3, d, H, d_h)
    3: 3 * L + 2 * D,  # (3L, d, d)
    2: 3 * L + D * D,  # (3L, d·d)
}
CARA_MODES = {
    m: (lambda r, n=n: r * (n + 1) + r * (9 * L + 2 * D + 1) + (D + 4 * D + D))
    for m, n in CARA_QKV_SIZES.items()
}
TABLE = (
    [("cara", dict(rank=r), 2526 * r + 4608) for r in (1, 2, 4, 8, 16, 32, 64)]
    + [("cara", dict(rank=r, modes=m), CARA_MODES[m](r)) for m in (5, 3, 2) for r in (1, 8, 32)]
    + [("tenslora", dict(variant=v, rank=r), f(r)) for v, f in TENSLORA.items() for r in (4, 8)]
    + [
        ("tenslora", dict(variant=v, rank=r, factorization="cp"), f(r))
        for v, f in TENSLORA_CP.items()
        for r in (4, 8)
    ]
    + [("fact_tt", dict(rank=r), 1536 * r + 144 * r * r) for r in (4, 8, 16)]
    + [("fact_tk", dict(rank=r), 1536 * r + 144 * r + r**3) for r in (8, 16, 32)]
    + [("lorta", dict(rank=r), 860 * r) for r in (1, 4, 8, 16)]
    + [("lotr", dict(rank=r), 2 * D * r + 24 * r * r) for r in (8, 32)]
    + [("lora", dict(rank=r), r * 1536 * 24) for r in (4, 8, 16)]
    + [("lora", dict(rank=8, targets=("q", "k", "v")), 442_368)]
    + [("metatt", dict(rank=r), D * r + L * r * r + 3 * r * r + r * D) for r in (4, 8)]
    + [("serial_lora", dict(rank=r), 2 * D * r * L) for r in (4, 8)]
)
# literal figures from the papers' tables, checked against the formulas above
CARA_DEFAULT = [n for p, kw, n in TABLE if p == "cara" and "modes" not in kw]
assert CARA_DEFAULT == [7134, 9660, 14712, 24816, 45024, 85440, 166272]
assert TENSLORA["att_qkv_depth"](8) == 39640 and TENSLORA["qkv_depth"](4) == 6460
assert all(CARA_MODES[4](r) == 2526 * r + 4608 for r in (1, 8, 64))
assert [CARA_MODES[m](1) - 4608 for m in (5, 3, 2)] == [2505, 3218, 591506]
assert [TENSLORA_CP[v](4) for v in ("att", "qkv_depth", "att_qkv_depth")] == [121536, 6204, 3436]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def vit_b():
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False)


@pytest.mark.parametrize("name,kwargs,expected", TABLE)
def test_parameter_counts_on_vit_b(vit_b, name, kwargs, expected):
    assert ta.count_parameters(vit_b, presets.get(name, **kwargs)) == expected


ALL = ["lora", "cara", "tenslora", "fact_tt", "fact_tk", "lotr", "lorta", "metatt", "serial_lora"]


def test_list_and_unknown():
    assert presets.list() == sorted(ALL)
    with pytest.raises(KeyError, match="valid presets are: cara, fact_tk"):
        presets.get("carra")
    with pytest.raises(ConfigError, match="variant='qk'.*att_qkv_depth"):
        presets.get("tenslora", variant="qk")
    with pytest.raises(ConfigError, match=r"unknown arguments \['rnak'\]"):
        presets.get("cara", rnak=4)


SMALL = {
    "cara": dict(rank=4),
    "tenslora": dict(rank=3),
    "fact_tt": dict(rank=4),
    "fact_tk": dict(rank=4),
    "lotr": dict(rank=4),
    "lorta": dict(rank=4),
    "metatt": dict(rank=4),
    "serial_lora": dict(rank=4),
    "lora": dict(rank=4),
}


@pytest.mark.parametrize("name", ALL)
def test_noop_at_init_and_trains(name):
    torch.manual_seed(0)
    model = tiny_vit(dim=32, heads=4, num_classes=4).eval()
    x = torch.randn(16, 3, 16, 16)
    y = torch.randint(0, 4, (16,))
    # the head stays frozen: any loss decrease comes from the adapter alone
    assert_noop_then_trains(model, presets.get(name, modules_to_save=[], **SMALL[name]), x, y)


EXPECTED_PARAMETERS = {
    "cara": {  # R = 8; symbols of the CaRA paper: λ, layer factor, P1..P3
        "g0.weights": (8,),
        "g0.factor_depth*qkv": (36, 8),
        "g0.factor_in": (768, 8),
        "g0.factor_heads": (12, 8),
        "g0.factor_out": (64, 8),
        "g1.weights": (8,),
        "g1.factor_depth*qkv*slices": (108, 8),
        "g1.factor_out": (768, 8),
        "g1.factor_in": (768, 8),
        "g1_bias.bias_o": (768,),
        "g1_bias.bias_fc1": (3072,),
        "g1_bias.bias_fc2": (768,),
    },
    "tenslora": {  # qkv_depth, r = 4: Tucker core G and factors U_in, U_out, U_qkv, U_depth
        "g0.core": (4, 4, 4, 4),
        "g0.factor_in": (768, 4),
        "g0.factor_out": (768, 4),
        "g0.factor_qkv": (3, 4),
        "g0.factor_depth": (12, 4),
    },
    "fact_tt": {  # r = 8: U, Σ (one r×r core per slice), V
        "g0.core_in": (1, 768, 8),
        "g0.core_depth*qkv*slices": (8, 144, 8),
        "g0.core_out": (8, 768, 1),
    },
    "fact_tk": {  # r = 32: C, U, V, P
        "g0.core": (32, 32, 32),
        "g0.factor_depth*qkv*slices": (144, 32),
        "g0.factor_in": (768, 32),
        "g0.factor_out": (768, 32),
    },
    "lotr": {  # r = 8: R, M_i stacked over the 24 targets, L
        "g0.core_in": (1, 768, 8),
        "g0.core_depth*qkv": (8, 24, 8),
        "g0.core_out": (8, 768, 1),
    },
    "lorta": {  # r = 8: A (out), B (head_dim), C_h, C_m, C_l
        "g0.factor_out": (768, 8),
        "g0.factor_in": (64, 8),
        "g0.factor_heads": (12, 8),
        "g0.factor_qkv": (4, 8),
        "g0.factor_depth": (12, 8),
    },
    "metatt": {  # r = 8: TT cores over [in, depth, qkv, out]: d·r, L·r², M·r², r·d
        "g0.core_in": (1, 768, 8),
        "g0.core_depth": (8, 12, 8),
        "g0.core_qkv": (8, 3, 8),
        "g0.core_out": (8, 768, 1),
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMETERS))
def test_trained_parameters_are_the_methods_symbols(name):
    kwargs = {
        "cara": dict(rank=8),
        "tenslora": dict(rank=4),
        "fact_tt": dict(rank=8),
        "fact_tk": dict(rank=32),
        "lotr": dict(rank=8),
        "lorta": dict(rank=8),
        "metatt": dict(rank=8),
    }[name]
    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        am = ta.get_adapter_model(model, presets.get(name, **kwargs))
    got = {n: tuple(p.shape) for n, p in am.tensor_adapters.named_parameters()}
    assert got == EXPECTED_PARAMETERS[name]


def test_lora_and_serial_parameter_names():
    with torch.device("meta"):
        am = ta.get_adapter_model(timm.create_model("vit_base_patch16_224"), presets.get("lora"))
        sl = ta.get_adapter_model(
            timm.create_model("vit_base_patch16_224"), presets.get("serial_lora")
        )
    assert {n for n in dict(am.tensor_adapters.named_parameters()) if n.startswith("g0_l0_")} == {
        "g0_l0_q.lora_A",
        "g0_l0_q.lora_B",
        "g0_l0_v.lora_A",
        "g0_l0_v.lora_B",
    }
    shapes = {n: tuple(p.shape) for n, p in sl.tensor_adapters.named_parameters()}
    assert len(shapes) == 24 and shapes["g0_l0.lora_A"] == (8, 768)


@pytest.mark.parametrize("family", ["timm_vit", "hf_dinov2", "hf_bert"])
def test_cara_on_supported_families(family):
    model, inputs, out_of = make(family)
    with torch.no_grad():
        base = out_of(model(**inputs))
    am = ta.get_adapter_model(model, presets.get("cara", rank=2))
    with torch.no_grad():
        assert torch.equal(out_of(am(**inputs)), base)
        for p in am.tensor_adapters.parameters():
            p.normal_(0, 0.1)
        adapted = out_of(am(**inputs))
        am.merge_adapter()  # shared biases merge into the frozen biases
        torch.testing.assert_close(out_of(am(**inputs)), adapted, rtol=1e-4, atol=1e-5)


# TensLoRA's tensors per variant, from the shapes: (number of tensors, mode sizes), for a model
# with width d, L blocks, H heads of size dh (q, k, v adapted).
def tenslora_shapes(variant, d, l, h, dh):
    return {
        "att": (3 * l, [d, dh, h]),
        "qkv": (l, [d, d, 3]),
        "depth": (3, [d, d, l]),
        "att_qkv": (l, [d, dh, h, 3]),
        "att_depth": (3, [d, dh, h, l]),
        "qkv_depth": (1, [d, d, 3, l]),
        "att_qkv_depth": (1, [d, dh, h, 3, l]),
    }[variant]


def tenslora_count(variant, r, factorization, d, l, h, dh):
    """Tucker: Σ n·r + r^order per tensor; CP: Σ n·r per tensor (weights fixed ones)."""
    n, sizes = tenslora_shapes(variant, d, l, h, dh)
    core = r ** len(sizes) if factorization == "tucker" else 0
    return n * (r * sum(sizes) + core)


assert all(
    tenslora_count(v, r, "tucker", D, L, H, DH) == f(r) for v, f in TENSLORA.items() for r in (4, 8)
)
assert all(
    tenslora_count(v, r, "cp", D, L, H, DH) == f(r) for v, f in TENSLORA_CP.items() for r in (4, 8)
)


@pytest.mark.parametrize("family", ["hf_vit", "hf_bert"])
def test_tenslora_on_hf_vit_and_bert(family):
    """Every variant × factorisation on HF ViT and BERT (the paper's families): the exact
    count, a no-op at init, and once the factors are random the model's output moves and
    one target computes exactly ``base(x) + x ΔWᵀ``."""
    import transformers as tf

    if family == "hf_vit":
        torch.manual_seed(0)
        config = tf.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=8,
        )
        model = tf.ViTModel(config).eval()
        inputs, out_of = {"pixel_values": torch.randn(2, 3, 16, 16)}, lambda o: o.last_hidden_state
        target = "layers.1.attention.v_proj"
    else:
        model, inputs, out_of = make("hf_bert")
        target = "bert.encoder.layer.1.attention.self.value"
    with torch.no_grad():
        base = out_of(model(**inputs))
    for factorization in ("tucker", "cp"):
        for variant in presets.TENSLORA_VARIANTS:
            cfg = presets.get("tenslora", variant=variant, rank=2, factorization=factorization)
            assert ta.count_parameters(model, cfg) == tenslora_count(
                variant, 2, factorization, d=32, l=2, h=4, dh=8
            ), (variant, factorization)
            am = ta.get_adapter_model(model, cfg)
            layer = am.adapted_layers[target]
            seen: dict = {}
            hook = layer.register_forward_hook(lambda m, a, y, seen=seen: seen.update(x=a[0], y=y))
            with torch.no_grad():
                assert torch.equal(out_of(am(**inputs)), base), (variant, factorization)
                for p in am.tensor_adapters.parameters():
                    p.normal_(0, 0.5)
                adapted = out_of(am(**inputs))
                assert (adapted - base).abs().max() > 1e-5, (variant, factorization)
                expected = layer.base_layer(seen["x"]) + seen["x"] @ am.delta_weight(target).t()
                torch.testing.assert_close(seen["y"], expected, rtol=1e-4, atol=1e-5)
            hook.remove()
            am.unload()


def test_presets_fail_clearly_where_the_structure_is_missing():
    llama, _, _ = make("hf_llama_gqa")
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with pytest.raises(TargetResolutionError, match=r"\['fc1', 'fc2'\] match nothing.*gate"):
        ta.get_adapter_model(llama, presets.get("cara"))
    with pytest.raises(
        TargetResolutionError, match=r"gate, up, down.*targets=\['q', 'k', 'v', 'o', 'mlp'\]"
    ):
        ta.get_adapter_model(llama, presets.get("fact_tt"))
    with pytest.raises(ModeError, match=r"grouped-query.*\['q'\] \| \['k', 'v'\]"):
        ta.get_adapter_model(llama, presets.get("tenslora", variant="qkv"))
    with pytest.raises(ModeError, match=r"\['q', 'o'\] \| \['k', 'v'\]; e.g. targets"):
        ta.get_adapter_model(llama, presets.get("lorta"))
    assert llama.state_dict().keys() == before.keys()  # raised before the model was touched
    assert all(torch.equal(v, before[k]) for k, v in llama.state_dict().items())
    assert not any("tensor_adapters" in n for n, _ in llama.named_modules())


def test_top_level_targets_are_split_across_a_presets_groups():
    cfg = presets.get("cara", targets=["q", "o", "mlp"])
    assert [g.targets for g in cfg.groups] == [["q"], ["o", "mlp"]]
    cfg = presets.get("cara", targets=["attn", "gate", "up", "down"])
    assert [g.targets for g in cfg.groups] == [["q", "k", "v"], ["o", "gate", "up", "down"]]
    cfg = presets.get("cara", targets=["q", "v"])  # the MLP tensor is dropped
    assert [g.targets for g in cfg.groups] == [["q", "v"]]
    llama, inputs, out = make("hf_llama_gqa")
    cfg = presets.get("cara", rank=2, targets=["q", "o", "mlp"])
    roles = {(row.group, row.role) for row in ta.resolve_targets(llama, cfg).rows}
    assert roles == {(0, "q"), (1, "o"), (1, "gate"), (1, "up"), (1, "down")}
    model = ta.get_adapter_model(llama, cfg)
    assert torch.isfinite(out(model(**inputs))).all()
    with pytest.raises(ConfigError, match="'fc9'|unknown target role"):
        presets.get("cara", targets=["q", "fc9"])


def test_tenslora_interleaved_heads_layout():
    torch.manual_seed(0)
    model = tiny_vit(dim=8, heads=2, depth=1).double()
    am = ta.get_adapter_model(
        model,
        presets.get(
            "tenslora", variant="att", rank=2, interleaved_heads=True, adapter_dtype="float64"
        ),
    )
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    T = am.tensor_adapters["g0_l0_q"].reconstruct()  # (in, head_dim, heads)
    dq = am.delta_weight("blocks.0.attn.qkv")[:8]
    for j in range(4):
        for h in range(2):
            torch.testing.assert_close(dq[j * 2 + h], T[:, j, h])  # column j·H + h


def test_dropout_placements_are_active_only_in_training():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    for name in ("cara", "fact_tk", "fact_tt"):
        am = ta.get_adapter_model(tiny_vit(dim=32, heads=4), presets.get(name, rank=4, dropout=0.5))
        with torch.no_grad():
            for p in am.tensor_adapters.parameters():
                p.normal_(0, 0.2)
            am.eval()
            a, b = am(x), am(x)
            am.train()
            c = am(x)
        assert torch.equal(a, b) and not torch.allclose(a, c), name
