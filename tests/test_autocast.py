"""Mixed precision: a training step of every preset under ``torch.autocast(bfloat16)`` gives
finite gradients for every adapter parameter, within bfloat16 tolerance of the float32 step."""

from __future__ import annotations

import pytest
import torch
from families import LLAMA_OVERRIDES, make

import tensadapt as ta


def _step(model, inputs, output, autocast: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same dropout masks in both steps
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = output(model(**inputs))
    if autocast:
        assert y.dtype == torch.bfloat16
    y.float().pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_every_preset_has_a_llama_override():
    assert sorted(LLAMA_OVERRIDES) == ta.presets.list()


@pytest.mark.parametrize("family", ["timm_vit", "hf_bert", "hf_llama_gqa"])
@pytest.mark.parametrize("preset", ta.presets.list())
def test_bf16_autocast_step_matches_float32(family, preset):
    base, inputs, output = make(family)
    overrides = LLAMA_OVERRIDES.get(preset, {}) if family == "hf_llama_gqa" else {}
    model = ta.get_adapter_model(base, ta.presets.get(preset, rank=4, **overrides)).train()
    with torch.no_grad():  # every factor nonzero, so every gradient is informative
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    want = _step(model, inputs, output, autocast=False)
    got = _step(model, inputs, output, autocast=True)
    assert want.keys() == got.keys()
    for name, g in got.items():
        assert g is not None and g.dtype == torch.float32, name
        assert torch.isfinite(g).all(), name
        rel = ((g - want[name]).norm() / want[name].norm().clamp_min(1e-12)).item()
        assert rel < 0.08, (name, rel)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", ta.presets.list())
def test_half_adapter_dtype_builds_and_trains(dtype, preset):
    """``adapter_dtype`` in half precision for every factorisation (orthogonal init drawn in
    float32, then cast)."""
    base, inputs, output = make("timm_vit")
    model = ta.get_adapter_model(base, ta.presets.get(preset, rank=4, adapter_dtype=dtype))
    output(model(**inputs)).float().mean().backward()
    adapter = [p for n, p in model.named_parameters() if p.requires_grad and "head" not in n]
    assert adapter and all(p.dtype == getattr(torch, dtype) for p in adapter)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter)


def test_fp16_grad_scaler_step():
    """The fp16 scaler path: a scaled loss, unscaled finite float32 gradients, a step taken."""
    base, inputs, output = make("timm_vit")
    model = ta.get_adapter_model(base, ta.presets.get("cara", rank=4)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    before = [p.detach().clone() for p in params]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = output(model(**inputs)).float().pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p.grad).all() for p in params)
    assert any(not torch.equal(p, q) for p, q in zip(params, before))
