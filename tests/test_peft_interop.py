"""Export to PEFT LoRA (lossless at exact rank) and import from PEFT LoRA (exact)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from families import make
from safetensors.torch import load_file

import tensadapt as ta

peft = pytest.importorskip("peft")

CONFIGS = {
    "lora": dict(factorization="lora", targets=["q", "v"], rank=2),
    "cp": dict(factorization="cp", modes=["depth", "qkv"], targets=["k", "v"], rank=3),
    "tucker": dict(factorization="tucker", modes=["depth"], targets=["attn"], rank=2),
    "tt": dict(factorization="tt", modes=["depth*qkv*slices"], targets=["all"], rank=2),
}


@pytest.mark.parametrize("family", ["hf_bert", "timm_vit", "hf_llama_gqa"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_reproduces_outputs_in_peft(family, name, tmp_path):
    model, inputs, out_of = make(family)
    twin = copy.deepcopy(model)
    am = ta.get_adapter_model(model, ta.TensorAdapterConfig(alpha=4.0, **CONFIGS[name]))
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_(0, 0.3)
        want = out_of(am(**inputs))
    errors = am.export_peft_lora(tmp_path / "peft")
    assert max(errors.values()) < 1e-6
    pm = peft.PeftModel.from_pretrained(twin, tmp_path / "peft")
    with torch.no_grad():
        got = out_of(pm(**inputs))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_truncated_export_reports_error(rank, tmp_path):
    """The error reported per module is the Eckart-Young optimum of its ΔW: with σ the
    singular values (numpy SVD), ||ΔW - ΔW_k||_F / ||ΔW||_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ σ_i²);
    and the exported pair really attains it."""
    model, inputs, out_of = make("hf_bert")
    am = ta.get_adapter_model(
        model,
        ta.TensorAdapterConfig(
            factorization="tucker", modes=["qkv"], targets=["q", "k", "v"], rank=4
        ),
    )
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    errors = am.export_peft_lora(tmp_path / "p", rank=rank)
    assert sorted(errors) == sorted(am.adapted_layers)
    saved = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    for name, reported in errors.items():
        delta = am.delta_weight(name).detach().double().numpy()
        sigma = np.linalg.svd(delta, compute_uv=False)
        assert sigma[rank] > 1e-6 * sigma[0]  # the truncation drops real energy
        want = np.sqrt(np.sum(sigma[rank:] ** 2)) / np.sqrt(np.sum(sigma**2))
        assert 0 < want < 1
        assert reported == pytest.approx(want, rel=1e-9, abs=1e-12)
        a = saved[f"base_model.model.{name}.lora_A.weight"].double().numpy()
        b = saved[f"base_model.model.{name}.lora_B.weight"].double().numpy()
        assert a.shape == (rank, delta.shape[1]) and b.shape == (delta.shape[0], rank)
        attained = np.linalg.norm(delta - b @ a) / np.linalg.norm(delta)
        assert attained == pytest.approx(want, rel=1e-5, abs=1e-6)  # float32 storage


@pytest.mark.parametrize(
    "family,targets",
    [
        ("hf_bert", ["query", "value"]),
        ("timm_vit", ["qkv"]),
        ("hf_llama_gqa", ["k_proj", "v_proj", "o_proj"]),
    ],
)
def test_import_peft_lora_is_exact(family, targets, tmp_path):
    model, inputs, out_of = make(family)
    twin = copy.deepcopy(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
        want = out_of(pm(**inputs))
    pm.save_pretrained(tmp_path / "peft")
    am = ta.TensorAdapterModel.from_peft_lora(twin, tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(out_of(am(**inputs)), want, rtol=1e-5, atol=1e-6)
