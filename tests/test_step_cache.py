"""Factor products shared across modules (``StepCache`` + ``BatchedSide``): formed once per
forward pass of the model, never shared between passes, identical results to forming each
module's slice on its own."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from conftest import tiny_vit
from torch.utils.checkpoint import checkpoint

import tensadapt as ta
from tensadapt import batched_side
from tensadapt.step_cache import StepCache

PRESETS = ["cara", "fact_tk", "fact_tt", "tenslora", "lorta", "lotr", "metatt"]


def _adapted(name: str, depth: int = 3):
    torch.manual_seed(0)
    model = tiny_vit(depth=depth, dim=16, heads=2).double()
    kw = {"dropout": 0.0} if name in ("cara", "fact_tk", "fact_tt") else {}  # deterministic
    cfg = ta.presets.get(name, rank=2, adapter_dtype="float64", strategy="contract", **kw)
    am = ta.get_adapter_model(model, cfg)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    return am


def _count_builds(monkeypatch) -> list[int]:
    count = [0]
    build = batched_side.BatchedSide._build

    def counted(self, terms):
        count[0] += 1
        return build(self, terms)

    monkeypatch.setattr(batched_side.BatchedSide, "_build", counted)
    return count


def _train(am, steps: int = 3) -> dict[str, torch.Tensor]:
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(5)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        am(x).square().mean().backward()
        opt.step()
    return {n: p.detach().clone() for n, p in am.tensor_adapters.named_parameters()}


@pytest.mark.parametrize("name", PRESETS)
def test_shared_products_train_exactly_like_per_module_slices(name, monkeypatch):
    """Three AdamW steps (the cache must see each step's new factors) give the parameters
    that forming every module's slice separately gives; the products are formed once per
    forward per structure, fewer times than there are modules."""
    builds = _count_builds(monkeypatch)
    got = _train(_adapted(name))
    n_modules = len(_adapted(name).adapted_layers)
    assert 0 < builds[0] < 3 * n_modules, builds[0]
    monkeypatch.setattr(StepCache, "get", lambda *a, **k: None)
    want = _train(_adapted(name))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12)


def test_two_forward_passes_keep_separate_graphs():
    """Forward, forward, then a backward of each: no graph is shared between the passes."""
    am = _adapted("cara")
    x1, x2 = torch.randn(2, 3, 16, 16, dtype=torch.float64).unbind(0)
    loss1 = am(x1[None]).sum()
    loss2 = am(x2[None]).square().sum()
    loss1.backward()
    loss2.backward()
    got = {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}
    am.zero_grad()
    (am(x1[None]).sum() + am(x2[None]).square().sum()).backward()
    for n, p in am.tensor_adapters.named_parameters():
        torch.testing.assert_close(got[n], p.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches(reentrant):
    """Blocks recomputed in the backward (both checkpoint flavours) give the same gradients;
    the non-reentrant flavour needs the recomputation to save what the forward saved."""
    am = _adapted("tenslora")
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    am(x).square().sum().backward()
    want = {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}
    am.zero_grad()
    blocks = am.base_model.blocks
    forwards = [b.forward for b in blocks]
    for b, f in zip(blocks, forwards):
        b.forward = lambda h, f=f: checkpoint(f, h, use_reentrant=reentrant)
    am(x.requires_grad_(reentrant)).square().sum().backward()
    for n, p in am.tensor_adapters.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-12)


def test_cache_lives_for_one_forward_pass(monkeypatch):
    """Empty after each pass (also one that raises); a block called on its own forms its
    own slices; copies and pickles of a used model start empty and still work."""
    builds = _count_builds(monkeypatch)
    am = _adapted("cara")
    cache = am.adapted_layers["blocks.0.attn.qkv"].state.step_cache
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out = am(x)
    assert builds[0] > 0 and not cache._entries and cache._depth == 0
    builds[0] = 0
    tokens = torch.randn(2, 5, 16, dtype=torch.float64)
    am.base_model.blocks[0](tokens)
    assert builds[0] == 0
    with pytest.raises(ValueError):  # a 2-D input is not an image batch
        am(torch.randn(2, 5, dtype=torch.float64))
    assert cache._depth == 0 and not cache._entries
    twin = copy.deepcopy(am)
    builds[0] = 0
    torch.testing.assert_close(twin(x), out)
    assert builds[0] > 0  # the copy's own hooks open its own cache
    builds[0] = 0
    buffer = io.BytesIO()
    torch.save(am.base_model, buffer, pickle_protocol=pickle.HIGHEST_PROTOCOL)  # hooks too
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x), out)
    assert builds[0] > 0
    base = am.unload()
    assert not base._forward_pre_hooks and not base._forward_hooks


@pytest.mark.parametrize("reentrant", [None, True, False])
def test_hf_gradient_checkpointing_matches(reentrant):
    """HF's own ``gradient_checkpointing_enable`` (each flavour) gives the gradients of the
    model without checkpointing."""
    from families import make

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model, inputs, logits = make("hf_bert")
        model.double().train()
        if checkpointing:
            kwargs = None if reentrant is None else {"use_reentrant": reentrant}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        cfg = ta.presets.get("tenslora", rank=2, adapter_dtype="float64", strategy="contract")
        am = ta.get_adapter_model(model, cfg)
        with torch.no_grad():
            for p in am.tensor_adapters.parameters():
                p.normal_()
        logits(am(**inputs)).square().sum().backward()
        return {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}

    want = grads(False)
    got = grads(True)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12)


def test_shared_blocks_reach_modules_without_view_ops(monkeypatch):
    """Within a forward pass, a batched side's block reaches its module as an ``unbind``
    output already in matrix form (no squeeze, permute or reshape node per module), a side
    with no sliced term (and an unsliced one-term side, CaRA's ``A``) is one tensor shared
    by every module, and no module runs a contraction of its own: the contractions per pass
    are one per shared product, however many modules read them."""
    from tensadapt import contraction
    from tensadapt.batched_side import BatchedSide, SharedSide
    from tensadapt.program import ContributionProgram

    am = _adapted("cara")
    seen: list[tuple[ContributionProgram, torch.Tensor, torch.Tensor]] = []
    low_rank = ContributionProgram.low_rank

    def recorded(self, factors, cache=None):
        a, b = low_rank(self, factors, cache)
        seen.append((self, a, b))
        return a, b

    calls = [0]
    plan_call = contraction.ContractionPlan.__call__

    def counted(self, *operands):
        calls[0] += 1
        return plan_call(self, *operands)

    monkeypatch.setattr(ContributionProgram, "low_rank", recorded)
    monkeypatch.setattr(contraction.ContractionPlan, "__call__", counted)
    am(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    kinds = {"unbind": 0, "whole": 0, "window": 0}
    shared: dict[tuple, set[int]] = {}
    keys = set()
    for p, a, b in seen:
        tensor_id = id(p.tensor)
        for name, m in (("a", a), ("b", b)):
            plan = p._batched.get(name)
            if isinstance(plan, BatchedSide):
                kinds["unbind"] += 1
                assert type(m.grad_fn).__name__ == "UnbindBackward0" and m.dim() == 2
            elif isinstance(plan, SharedSide) and plan.axis is None:
                kinds["whole"] += 1
                shared.setdefault((tensor_id, plan.key), set()).add(id(m))
            elif isinstance(plan, SharedSide):
                kinds["window"] += 1
            elif p._sides[name].view is not None and not p.terms[p._sides[name].terms[0]].ops:
                shared.setdefault((tensor_id, name, "view"), set()).add(id(m))
                assert m.is_contiguous()
            if plan is not None:
                keys.add((tensor_id, plan.key))
    assert all(kinds.values()), kinds
    assert shared and all(len(ids) == 1 for ids in shared.values())
    assert calls[0] == len(keys) < len(seen)
