"""The shared adapter contract over every model family × factorisation × a few mode sets."""

from __future__ import annotations

import pytest
import torch
from families import EXTRA_FAMILIES, FAMILIES, GQA_FAMILIES, make

import tensadapt as ta

MODE_SETS = {
    "depth": dict(modes=["depth"], targets=["attn"]),
    "depth+qkv+heads": dict(modes=["depth", "qkv", "heads"], targets=["q", "k", "v"]),
    "fused-slices-residual": dict(
        modes=["depth*qkv*slices"], targets=["all"], orientation="residual"
    ),
}
FACTORIZATIONS = ("cp", "tucker", "tt")
CASES = [(fam, "lora", "per-layer") for fam in FAMILIES] + [
    (fam, fac, ms) for fam in FAMILIES for fac in FACTORIZATIONS for ms in MODE_SETS
]
# the further families get plain LoRA plus each mode set once, the factorisation rotating with
# the family, so that every factorisation x mode set pair still meets at least one of them
CASES += [(fam, "lora", "per-layer") for fam in EXTRA_FAMILIES] + [
    (fam, FACTORIZATIONS[(i + j) % 3], ms)
    for i, fam in enumerate(EXTRA_FAMILIES)
    for j, ms in enumerate(MODE_SETS)
]


def config_for(family, factorization, mode_set):
    if mode_set == "per-layer":
        fields = dict(targets=["all"])
    else:
        fields = dict(MODE_SETS[mode_set])
    if family in GQA_FAMILIES and mode_set == "depth+qkv+heads":
        fields["targets"] = ["k", "v"]  # grouped-query k/v share a shape; q does not
    rank = 2 if factorization == "tucker" else 3
    return ta.TensorAdapterConfig(factorization=factorization, rank=rank, alpha=6.0, **fields)


def randomize(am):
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_(0, 0.3)


@pytest.mark.parametrize("family,factorization,mode_set", CASES)
def test_contract(family, factorization, mode_set, tmp_path):
    model, inputs, out_of = make(family)
    cfg = config_for(family, factorization, mode_set)
    with torch.no_grad():
        base = out_of(model(**inputs)).clone()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    am = ta.get_adapter_model(model, cfg)

    # only adapter and modules_to_save parameters train
    trainable = {n for n, p in am.named_parameters() if p.requires_grad}
    saved = tuple(f"base_model.{m}." for m in am.modules_to_save)
    assert trainable and all(n.startswith(("tensor_adapters.", *saved)) for n in trainable)
    assert any(n.startswith("tensor_adapters.") for n in trainable)

    with torch.no_grad():
        assert torch.equal(out_of(am(**inputs)), base)  # no-op at init
        randomize(am)
        # each target's output change == x @ delta_weight(name).T
        seen = {}

        def hook(name):
            def fn(module, args, output):
                seen[name] = (args[0], output)

            return fn

        handles = [l.register_forward_hook(hook(n)) for n, l in am.adapted_layers.items()]
        adapted = out_of(am(**inputs)).clone()
        for h in handles:
            h.remove()
        assert not torch.allclose(adapted, base)
        assert set(seen) == set(am.adapted_layers)
        for name, (x, y) in seen.items():
            layer = am.adapted_layers[name]
            change = y - layer.base_layer(x)
            want = x @ am.delta_weight(name).T
            torch.testing.assert_close(change, want, rtol=1e-4, atol=1e-5)

        with am.disable_adapter():
            assert torch.equal(out_of(am(**inputs)), base)

        am.merge_adapter()
        torch.testing.assert_close(out_of(am(**inputs)), adapted, rtol=1e-4, atol=1e-5)
        am.unmerge_adapter()
        for k, w in model.state_dict().items():
            orig = base_weights[k.replace(".base_layer", "")]
            err = (w - orig).norm() / max(orig.norm(), 1e-12)
            assert err <= 1e-6, (k, float(err))
        torch.testing.assert_close(out_of(am(**inputs)), adapted, rtol=1e-4, atol=1e-5)

    am.save_pretrained(tmp_path / "adapter")
    fresh, _, _ = make(family)
    loaded = ta.TensorAdapterModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(out_of(loaded(**inputs)), adapted)

    plain = am.merge_and_unload()
    assert not any(isinstance(m, ta.TensorAdapterLayer) for m in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(out_of(plain(**inputs)), adapted, rtol=1e-4, atol=1e-5)
