"""The low-rank forward path (``LowRankLinear``) against autograd on the same maths."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit

import tensadapt as ta
from tensadapt import low_rank
from tensadapt.layers import LowRankLinear


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("with_xa", [False, True])
def test_low_rank_linear_gradcheck(k, with_xa, fold, monkeypatch):
    """Both forms: folded (``x (W + B Ā)ᵀ``) and unfolded (``addmm_`` of the low-rank term)."""
    if not fold:  # the form half-precision weights take
        monkeypatch.setattr(low_rank, "FOLD_DTYPES", ())
    n, d_in, d_out, r = 5, 6, 4, 3
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    xa = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True) if with_xa else None
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, d_in // k, dtype=torch.float64, requires_grad=True)
    bm = torch.randn(d_out, k * r, dtype=torch.float64, requires_grad=True)
    inputs = (x, xa, w, b, a, bm, 0.0, k)
    assert torch.autograd.gradcheck(lambda *t: LowRankLinear.apply(*t), inputs)


def test_low_rank_linear_rank_dropout_matches_autograd():
    n, d_in, d_out, r, k, p = 7, 8, 5, 2, 2, 0.4
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    a = torch.randn(r, d_in // k, dtype=torch.float64, requires_grad=True)
    bm = torch.randn(d_out, k * r, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    got = LowRankLinear.apply(x, None, w, None, a, bm, p, k)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (x, a, bm), g)
    torch.manual_seed(3)
    h = (x.reshape(n * k, -1) @ a.t()).view(n, -1)
    want = x @ w.t() + torch.nn.functional.dropout(h, p, training=True) @ bm.t()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for mine, ref in zip(grads, torch.autograd.grad(want, (x, a, bm), g)):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "name,dropout",
    [("fact_tk", 0.0), ("fact_tk", 0.5), ("fact_tt", 0.5), ("cara", 0.0), ("lorta", None)]
    + [("serial_lora", None), ("tenslora", None), ("lotr", None), ("metatt", None)],
)
def test_fast_path_matches_general_path_with_gradients(name, dropout):
    """With rank dropout planned but inactive (eval), fc2's cut is per input chunk."""
    torch.manual_seed(0)
    model = tiny_vit(dim=16, heads=2).double()
    kw = {} if dropout is None else {"dropout": dropout}
    cfg = ta.presets.get(name, rank=2, adapter_dtype="float64", **kw)
    am = ta.get_adapter_model(model, cfg).eval()
    if dropout:
        assert any(p.chunks > 1 for l in am.adapted_layers.values() for p in l.programs)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def run():
        am.zero_grad()
        out = am(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}

    fast_out, fast_grads = run()
    for layer in am.adapted_layers.values():
        layer.__dict__["_forward_low_rank"] = lambda *a: None  # force the general path
    slow_out, slow_grads = run()
    torch.testing.assert_close(fast_out, slow_out, rtol=0, atol=1e-10)
    for key in fast_grads:
        torch.testing.assert_close(fast_grads[key], slow_grads[key], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("cara", {"strategy": "materialise", "dropout": 0.0}),
        ("cara", {}),  # DropConnect on ΔW, in training
        ("fact_tt", {"strategy": "materialise", "dropout": 0.0}),
        ("serial_lora", {"strategy": "materialise"}),
        ("tenslora", {"strategy": "materialise"}),
    ],
)
def test_folded_path_matches_general_path_with_gradients(name, kw):
    """Materialised updates folded into the weight: same outputs, same factor gradients."""
    torch.manual_seed(0)
    model = tiny_vit(dim=16, heads=2).double()
    cfg = ta.presets.get(name, rank=2, adapter_dtype="float64", **kw)
    am = ta.get_adapter_model(model, cfg).train()
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    calls = []

    def run():
        am.zero_grad()
        torch.manual_seed(7)  # the same DropConnect masks on both paths
        out = am(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}

    for layer in am.adapted_layers.values():
        folded = layer._forward_folded
        layer.__dict__["_forward_folded"] = lambda *a, f=folded: calls.append(1) or f(*a)
    fold_out, fold_grads = run()
    assert calls, "the folded path was not taken"
    for layer in am.adapted_layers.values():
        layer.__dict__["_forward_folded"] = lambda *a: None  # force the general path
    slow_out, slow_grads = run()
    torch.testing.assert_close(fold_out, slow_out, rtol=0, atol=1e-10)
    for key in fold_grads:
        torch.testing.assert_close(fold_grads[key], slow_grads[key], rtol=1e-9, atol=1e-10)


def test_half_precision_weight_keeps_a_small_update():
    """A bf16 weight is not folded: ``W + B A`` rounded to bf16 would lose a small update.

    ``W x = 0`` exactly here (paired columns ``c, -c`` against paired equal inputs), so the
    output is the update alone and any rounding of ``W + B A`` shows in full."""
    torch.manual_seed(0)
    c = torch.randint(1, 5, (16, 16)).float()
    w = torch.stack([c, -c], dim=2).reshape(16, 32).bfloat16()
    x = torch.randn(64, 16).repeat_interleave(2, dim=1).bfloat16()
    a = torch.randn(4, 32).bfloat16()
    bm = (1e-3 * torch.randn(16, 4)).bfloat16()
    assert (x @ w.t()).abs().max() == 0
    got = LowRankLinear.apply(x, None, w, None, a, bm, 0.0, 1).float()
    want = (x.float() @ a.float().t()) @ bm.float().t()
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.02 * want.abs().max().item())


@pytest.mark.parametrize("n", [7, 128, 130, 1024])
def test_token_product_is_the_plain_product(n):
    u = torch.randn(n, 5, dtype=torch.float64)
    v = torch.randn(n, 11, dtype=torch.float64)
    torch.testing.assert_close(low_rank.token_product(u, v), u.t() @ v, rtol=1e-12, atol=1e-12)
    strided = torch.randn(n, 16, dtype=torch.float64)[:, 3:8]  # a column slice, as gh is
    want = strided.t() @ v
    torch.testing.assert_close(low_rank.token_product(strided, v), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_block_product_is_b_times_block_diagonal_a(k):
    bm = torch.randn(4, k * 2, dtype=torch.float64)
    a = torch.randn(2, 5, dtype=torch.float64)
    want = bm @ torch.block_diag(*[a] * k)
    torch.testing.assert_close(low_rank.block_product(bm, a, k), want, rtol=0, atol=1e-12)
