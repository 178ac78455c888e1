"""``torch.compile(model, fullgraph=True)``: a training step of a preset traces as one graph
from a cold start (no graph break: masks, keys, plan choices and kernel checks are constants
or traced ops), and 5 further steps at the same shape compile nothing new.

The default suite runs one cheap preset per family; ``pytest -m compile`` runs every preset
on the three families (CI runs it once)."""

from __future__ import annotations

import pytest
import torch
from families import make, preset_overrides
from torch._dynamo.utils import counters

import tensadapt as ta

FAMILIES = ["timm_vit", "hf_bert", "hf_llama_gqa"]


def _adapted(family: str, preset: str):
    base, inputs, output = make(family)
    config = ta.presets.get(preset, rank=4, **preset_overrides(family, preset))
    model = ta.get_adapter_model(base, config).train()
    with torch.no_grad():  # every factor nonzero, so every gradient is informative
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model, inputs, output


def _grads(model, inputs, output, forward) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    output(forward(**inputs)).float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _check(family: str, preset: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    model, inputs, output = _adapted(family, preset)
    compiled = torch.compile(model, fullgraph=True)
    dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    want = None if dropout else _grads(model, inputs, output, model)
    got = _grads(model, inputs, output, compiled)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    for _ in range(5):
        _grads(model, inputs, output, compiled)
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["recompiles"])
    for name, g in got.items():
        assert torch.isfinite(g).all(), name
        if want is not None:  # no dropout: the compiled step is the eager step
            torch.testing.assert_close(g, want[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "family, preset", [("timm_vit", "lora"), ("hf_bert", "serial_lora"), ("hf_llama_gqa", "lora")]
)
def test_fullgraph_compile_cold_then_no_recompiles(family, preset):
    _check(family, preset)


@pytest.mark.compile
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", ta.presets.list())
def test_fullgraph_compile_every_preset(family, preset):
    _check(family, preset)
