"""The low-rank forward path (``LowRankLinear``) against autograd on the same maths."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_vit

import tensadapt as ta
from tensadapt import low_rank
from tensadapt.layers import LowRankLinear


def assert_path_matches_general_path(am, path="_forward_low_rank", after=None):
    """One forward and backward of ``am`` as it runs, then with ``path`` (a layer method
    that returns None to decline) switched off: same output, same adapter gradients, under
    the same random masks. ``after`` runs between the two."""
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def run():
        am.zero_grad()
        torch.manual_seed(7)
        out = am(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}

    fast_out, fast_grads = run()
    if after is not None:
        after()
    for layer in am.adapted_layers.values():
        layer.__dict__[path] = lambda *a: None  # force the general path
    slow_out, slow_grads = run()
    torch.testing.assert_close(fast_out, slow_out, rtol=0, atol=1e-10)
    for key in fast_grads:
        torch.testing.assert_close(fast_grads[key], slow_grads[key], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("with_xa", [False, True])
@pytest.mark.parametrize("with_mix", [False, True])
@pytest.mark.parametrize("need_x", [True, False])
def test_low_rank_linear_gradcheck(k, with_xa, with_mix, need_x, fold, monkeypatch):
    """Both forms: folded (``x (W + B M Ā)ᵀ``) and unfolded (``addmm_`` of the low-rank term),
    with and without a mix ``M`` between the rank activations and ``B``."""
    if not fold:  # the form half-precision weights take
        monkeypatch.setattr(low_rank, "FOLD_DTYPES", ())
    n, d_in, d_out, r, r2 = 5, 6, 4, 3, 2
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=need_x)
    xa = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True) if with_xa else None
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    b = torch.randn(d_out, dtype=torch.float64, requires_grad=True)
    a = torch.randn(r, d_in // k, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(r2, k * r, dtype=torch.float64, requires_grad=True) if with_mix else None
    bm = torch.randn(d_out, r2 if with_mix else k * r, dtype=torch.float64, requires_grad=True)
    inputs = (x, xa, w, b, a, bm, 0.0, k, mix)
    assert torch.autograd.gradcheck(lambda *t: LowRankLinear.apply(*t), inputs)


@pytest.mark.parametrize("with_mix", [False, True])
def test_low_rank_linear_rank_dropout_matches_autograd(with_mix):
    n, d_in, d_out, r, k, p = 7, 8, 5, 2, 2, 0.4
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    a = torch.randn(r, d_in // k, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(3, k * r, dtype=torch.float64, requires_grad=True) if with_mix else None
    bm = torch.randn(d_out, 3 if with_mix else k * r, dtype=torch.float64, requires_grad=True)
    params = (x, a, bm) + ((mix,) if with_mix else ())
    torch.manual_seed(3)
    got = LowRankLinear.apply(x, None, w, None, a, bm, p, k, mix)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, params, g)
    torch.manual_seed(3)
    h = (x.reshape(n * k, -1) @ a.t()).view(n, -1)
    keep = low_rank.keep_mask(tuple(h.shape), p, h.device)
    b_eff = bm if mix is None else bm @ mix
    want = x @ w.t() + (h * keep * low_rank.keep_scale(p)) @ b_eff.t()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for mine, ref in zip(grads, torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "name,dropout",
    [("fact_tk", 0.0), ("fact_tk", 0.5), ("fact_tt", 0.5), ("cara", 0.0), ("lorta", None)]
    + [("serial_lora", None), ("tenslora", None), ("lotr", None), ("metatt", None)],
)
def test_fast_path_matches_general_path_with_gradients(name, dropout):
    """With rank dropout planned but inactive (eval), fc2's cut is per input chunk and its
    output side is ``B' M`` (folded here as ``B = B' M``)."""
    torch.manual_seed(0)
    model = tiny_vit(dim=16, heads=2).double()
    kw = {} if dropout is None else {"dropout": dropout}
    cfg = ta.presets.get(name, rank=2, adapter_dtype="float64", **kw)
    am = ta.get_adapter_model(model, cfg).eval()
    if dropout:
        chunked = [p for l in am.adapted_layers.values() for p in l.programs if p.chunks > 1]
        assert chunked
        # fc2's B (rank 4·R) splits into B' M with M from the core: rank R against the outputs
        assert all(p.mix_eq is not None and p.mix_rank == 2 for p in chunked)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    assert_path_matches_general_path(am)


@pytest.mark.parametrize(
    "name,kw",
    [
        ("cara", {"strategy": "materialise", "dropout": 0.0}),
        ("cara", {}),  # DropConnect on ΔW, in training (its own path switched off)
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
    calls = []
    for layer in am.adapted_layers.values():
        layer.__dict__["_forward_drop_connect"] = lambda *a: None  # DropConnect: fold it here
        folded = layer._forward_folded
        layer.__dict__["_forward_folded"] = lambda *a, f=folded: calls.append(1) or f(*a)

    def taken():
        assert calls, "the folded path was not taken"

    assert_path_matches_general_path(am, "_forward_folded", after=taken)


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


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_law(p):
    """Bernoulli(1 - p): the kept fraction within 5 σ, draws independent of each other
    (neighbours agree as often as independence predicts), reproducible from the seed."""
    torch.manual_seed(0)
    m = low_rank.keep_mask((400, 250), p, torch.device("cpu"))
    n = m.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(m.double().mean().item() - (1 - p)) < 5 * sigma
    same = (m[:, 1:] == m[:, :-1]).double().mean().item()
    want = p * p + (1 - p) * (1 - p)
    assert abs(same - want) < 5 * (want * (1 - want) / n) ** 0.5
    torch.manual_seed(0)
    assert torch.equal(m, low_rank.keep_mask((400, 250), p, torch.device("cpu")))
    assert not low_rank.keep_mask((8, 8), 1.0, torch.device("cpu")).any()
    assert low_rank.keep_mask((3, 5), 0.0, torch.device("cpu")).all()
    # the realised p′ is within 2⁻¹⁷ of p and the scale is its unbiased one
    q = low_rank.quantised_p(p)
    assert abs(q - p) <= 2**-17 and q * 2**16 == int(q * 2**16)
    assert low_rank.keep_scale(p) == 1 / (1 - q)
    assert low_rank.keep_scale(1.0) == 0.0


def test_keep_mask_slots_of_one_draw_are_independent():
    """Four decisions share one 64-bit draw: each of the four positions keeps at the same
    rate, and two positions agree as often as independence predicts."""
    p = 0.5
    torch.manual_seed(1)
    m = low_rank.keep_mask((40_000, 4), p, torch.device("cpu")).double()
    n = m.shape[0]
    sigma = (p * (1 - p) / n) ** 0.5
    for slot in range(4):
        assert abs(m[:, slot].mean().item() - (1 - p)) < 5 * sigma
    for i, j in [(0, 1), (1, 2), (2, 3), (0, 3)]:
        same = (m[:, i] == m[:, j]).double().mean().item()
        assert abs(same - 0.5) < 5 * (0.25 / n) ** 0.5


@pytest.mark.parametrize("name", ["fact_tk", "fact_tt"])
def test_mixed_output_side_matches_full_b_under_rank_dropout(name):
    """Training with rank dropout (unfolded): ``y += (h Mᵀ) B'ᵀ`` gives the outputs and
    gradients of ``y += h (B' M)ᵀ`` under the same masks."""
    torch.manual_seed(0)
    model = tiny_vit(dim=16, heads=2).double()
    cfg = ta.presets.get(name, rank=2, dropout=0.3, adapter_dtype="float64")
    am = ta.get_adapter_model(model, cfg).train()
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)

    def run():
        torch.manual_seed(7)
        am.zero_grad()
        out = am(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}

    mixed_out, mixed_grads = run()
    programs = [p for l in am.adapted_layers.values() for p in l.programs if p.mix_eq]
    assert programs
    for p in programs:  # the same cut without the mix: B formed whole
        p.cut = dataclasses.replace(p.cut, mix=None)
    full_out, full_grads = run()
    torch.testing.assert_close(mixed_out, full_out, rtol=0, atol=1e-10)
    for key in full_grads:
        torch.testing.assert_close(mixed_grads[key], full_grads[key], rtol=1e-9, atol=1e-10)


def test_merge_mix_is_m_times_block_diagonal_a():
    """``M Ā`` against the dense block-diagonal ``Ā``; kept apart when the merge costs more."""
    torch.manual_seed(0)
    k, r, r_mix, chunk, out = 3, 4, 2, 5, 7
    a = torch.randn(r, chunk, dtype=torch.float64)
    mix = torch.randn(r_mix, k * r, dtype=torch.float64)
    merged, no_mix, one = low_rank.merge_mix(a, mix, k, (out, k * chunk))
    assert no_mix is None and one == 1
    torch.testing.assert_close(merged, mix @ torch.block_diag(*[a] * k), rtol=0, atol=1e-14)
    # R' = 12 on a wide input and narrow output: R'(in + out) > R·in + k·R·out, kept apart
    wide = torch.randn(12, k * r, dtype=torch.float64)
    kept = low_rank.merge_mix(a, wide, k, (1, k * chunk))
    assert kept[0] is a and kept[1] is wide and kept[2] == k


@pytest.mark.parametrize("name", ["fact_tk", "fact_tt"])
def test_folded_chunked_cut_runs_as_one_rank_r_map(name, monkeypatch):
    """Folded (no rank dropout active), fc2's per-slice cut ``B' M Ā`` runs as ``B' (M Ā)``:
    one ``LowRankLinear`` call with ``k = 1``, rank ``R'`` and no mix, with the outputs and
    gradients of the general path."""
    torch.manual_seed(0)
    model = tiny_vit(dim=16, heads=2).double()
    cfg = ta.presets.get(name, rank=2, dropout=0.5, adapter_dtype="float64")
    am = ta.get_adapter_model(model, cfg).eval()
    chunked = [p for l in am.adapted_layers.values() for p in l.programs if p.chunks > 1]
    assert chunked and all(p.mix_eq is not None for p in chunked)
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    calls = []
    apply = LowRankLinear.apply

    def spy(x, xa, w, b, a, bm, p, k, mix=None):
        calls.append((tuple(w.shape), a.shape[0], k, mix is None))
        return apply(x, xa, w, b, a, bm, p, k, mix)

    monkeypatch.setattr("tensadapt.layers.LowRankLinear.apply", spy)

    def fc2_calls_are_rank_r():
        fc2 = [c for c in calls if c[0] == (16, 64)]
        assert fc2 and all(c[1:] == (chunked[0].mix_rank, 1, True) for c in fc2)

    assert_path_matches_general_path(am, after=fc2_calls_are_rank_r)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_column_major_a_gives_the_row_major_result(p):
    """Factor products arrive as ``A = Pᵀ`` views (column-major); the function copies ``A``
    to row-major for speed, with the same output and the gradient in ``A``'s own shape."""
    torch.manual_seed(0)
    x = torch.randn(40, 6, dtype=torch.float64)
    w, bm = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    p_in = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(40, 5, dtype=torch.float64)
    results = []
    for a_of in (lambda q: q.t(), lambda q: q.t().contiguous()):
        torch.manual_seed(3)
        out = LowRankLinear.apply(x, None, w, None, a_of(p_in), bm, p, 1)
        (grad,) = torch.autograd.grad(out, p_in, g)
        results.append((out, grad))
    assert not p_in.t().is_contiguous()
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "groups",
    [
        [dict(targets=["v", "q"], scale=0.5)],  # k's rows between them are a gap
        [dict(targets=["k"], scale=0.5), dict(targets=["q", "v"], scale=2.0)],  # two scales
        [dict(targets=["k"], scale=1.5)],  # one contribution: not block-diagonal
    ],
)
def test_slices_of_one_map_run_as_one_block_diagonal_update(groups):
    """q, k and v contributions of DINOv2's fused ``qkv`` in one ``LowRankLinear`` call with
    ``B = diag(s_c B_c)`` and zero rows between the blocks: same output and factor gradients
    as the dense ``Σ_c s_c ΔW_c`` of each contribution (the general path)."""
    torch.manual_seed(0)
    model = tiny_vit(dim=16, heads=2).double()
    cfg = ta.TensorAdapterConfig(
        factorization="lora",
        modes=["out", "in"],
        rank=2,
        adapter_dtype="float64",
        groups=[dict(factorization="lora", modes=["out", "in"], **g) for g in groups],
    )
    am = ta.get_adapter_model(model, cfg).train()
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    qkv = [layer for name, layer in am.adapted_layers.items() if name.endswith("qkv")]
    several = sum(len(g["targets"]) for g in groups) > 1
    assert all((layer._row_blocks is not None) == several for layer in qkv)
    if several:
        diag = []
        for layer in qkv:
            f = layer._block_diagonal
            layer.__dict__["_block_diagonal"] = lambda *a, f=f: diag.append(1) or f(*a)
    assert_path_matches_general_path(am)
    if several:
        assert len(diag) == len(qkv)
