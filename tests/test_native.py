"""Native thin passes (``tensadapt.native``) against dense float64 maths and the PyTorch path."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_vit

import tensadapt as ta
from tensadapt import native
from tensadapt.layers import LowRankLinear
from tensadapt.shared_input import SharedInputLowRank

X86 = platform.machine() in ("x86_64", "AMD64")
HAS_CC = shutil.which(os.environ.get("CC", "cc")) is not None
SWITCHED_OFF = os.environ.get("TENSADAPT_NATIVE", "1") == "0"
needs_native = pytest.mark.skipif(
    not (X86 and HAS_CC) or SWITCHED_OFF,
    reason="native thin passes build only on x86-64 with a C compiler, unless TENSADAPT_NATIVE=0",
)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


@needs_native
def test_native_builds_and_loads_here():
    """On an x86-64 machine with a compiler the library must build: a silent fallback here
    would hide a broken build."""
    if native.status() == "the CPU lacks AVX2 or FMA":
        pytest.skip(native.status())
    assert native.available(), native.status()


@needs_native
@pytest.mark.parametrize("n", [64, 67, 2083])
@pytest.mark.parametrize("m", [8, 13, 384, 392, 1537])
@pytest.mark.parametrize("r", [1, 2, 6, 8, 9, 16, 24, 32, 33])
def test_passes_equal_dense_products(n, m, r, each_isa):
    """``z P``, ``uᵀ z`` and the fused ``(gy B, hbᵀ gy)`` against float64 products, with
    token counts and widths that leave row blocks, two- and one-register column strips
    and rank groups partial (``u`` of ``r + 1`` columns: register tiles of 1 to 6 rank
    rows), in each instruction set."""
    g = torch.Generator().manual_seed(n * 1000 + m * 10 + r)
    z = torch.randn(n, m, generator=g)
    p = torch.randn(m, r, generator=g)
    u = torch.randn(n, r + 1, generator=g)
    zd, pd, ud = z.double(), p.double(), u.double()
    assert _rel_err(native.rows_times(z, p), zd @ pd) < 1e-5
    assert _rel_err(native.cols_reduce(u, z), ud.t() @ zd) < 1e-5
    u1 = u[:, :1].contiguous()
    assert _rel_err(native.cols_reduce(u1, z), u1.double().t() @ zd) < 1e-5
    gh, gb = native.grad_pass(z, p, u)
    assert gh.shape == (n, r) and gb.shape == (r + 1, m)
    assert _rel_err(gh, zd @ pd) < 1e-5
    assert _rel_err(gb, ud.t() @ zd) < 1e-5
    # a transposed P (x Aᵀ with A stored (R, in)) packs to the same panels
    a = torch.randn(r, m, generator=g)
    assert _rel_err(native.rows_times(z, a.t()), zd @ a.double().t()) < 1e-5


@needs_native
@pytest.mark.parametrize(
    "n, k, widths, r",
    [
        (64, 8, [13], 1),
        (67, 392, [384, 24, 1537], 7),
        (2083, 384, [1152], 24),
        (1043, 384, [384, 1537], 32),
    ],
)
@pytest.mark.parametrize("shared", [False, True])
def test_factor_grads_equal_dense_products(n, k, widths, r, shared, each_isa):
    """``(gy B)ᵀ x``, ``gyᵀ (x Aᵀ)`` and ``1ᵀ gy`` for maps sharing ``x`` (and with ``shared``
    their ``A``: ``gA = (Σ_j gy_j B_j)ᵀ x``), against float64 products, with partial row
    blocks, rank groups, widths off the vector width and bias gradients on some maps only, in
    each instruction set."""
    g = torch.Generator().manual_seed(n + k + r)
    x = torch.randn(n, k, generator=g)
    gys = [torch.randn(n, m, generator=g) for m in widths]
    a_list = [torch.randn(r, k, generator=g) for _ in widths]
    b_list = [torch.randn(m, r, generator=g) for m in widths]
    biases = [j % 2 == 0 for j in range(len(widths))]
    out = native.factor_grads(
        x, gys, a_list[:1] if shared else a_list, b_list, shared=shared, biases=biases
    )
    xd = x.double()
    gh_sum = sum(gy.double() @ b.double() for gy, b in zip(gys, b_list))
    for j, ((ga, gb, gbias), gy, a, b) in enumerate(zip(out, gys, a_list, b_list)):
        gyd = gy.double()
        a_j = a_list[0] if shared else a
        assert gb.shape == b.shape
        assert _rel_err(gb, gyd.t() @ (xd @ a_j.double().t())) < 1e-5
        if shared and j > 0:
            assert ga is None
        else:
            assert ga.shape == a.shape
            gh = gh_sum if shared else gyd @ b.double()
            assert _rel_err(ga, gh.t() @ xd) < 1e-5
        if biases[j]:
            assert _rel_err(gbias, gyd.sum(0)) < 1e-5
        else:
            assert gbias is None


@needs_native
def test_factor_grads_rejects_bad_map_counts():
    x = torch.randn(64, 8)
    with pytest.raises(ValueError, match="1 to 16 maps of one rank"):
        native.factor_grads(x, [], [], [])
    gys = [torch.randn(64, 8)] * 2
    with pytest.raises(ValueError, match="1 to 16 maps of one rank"):
        native.factor_grads(x, gys, [torch.randn(2, 8), torch.randn(3, 8)], [torch.randn(8, 2)] * 2)
    with pytest.raises(ValueError, match="2 gradients need 2 B factors and 2 A factors, got 2 B"):
        native.factor_grads(x, gys, [torch.randn(2, 8)], [torch.randn(8, 2)] * 2)
    with pytest.raises(ValueError, match="need 2 B factors and a shared A, got 1 B and 1 A"):
        native.factor_grads(x, gys, [torch.randn(2, 8)], [torch.randn(8, 2)], shared=True)


@needs_native
@pytest.mark.parametrize("n", [64, 67, 2083])
@pytest.mark.parametrize("m", [8, 13, 384, 392, 1537])
@pytest.mark.parametrize("r", [1, 7, 32, 64])
def test_expand_equals_dense_products(n, m, r, each_isa):
    """``c + u P`` against float64 products, without ``c``, with a row added to every token
    and with a full matrix (the fold ``W + B A``); token counts and widths that leave 6-row
    tiles, two- and one-register strips and single columns partial, in each instruction
    set."""
    g = torch.Generator().manual_seed(n * 1000 + m * 10 + r)
    u, p = torch.randn(n, r, generator=g), torch.randn(r, m, generator=g)
    row, mat = torch.randn(m, generator=g), torch.randn(n, m, generator=g)
    dense = u.double() @ p.double()
    assert _rel_err(native.rows_expand(u, p), dense) < 1e-5
    assert _rel_err(native.rows_expand(u, p, row), dense + row.double()) < 1e-5
    assert _rel_err(native.rows_expand(u, p, mat), dense + mat.double()) < 1e-5
    # a transposed P (h Bᵀ with B stored (out, R)) is made contiguous first
    b = torch.randn(m, r, generator=g)
    assert _rel_err(native.rows_expand(u, b.t()), u.double() @ b.double().t()) < 1e-5
    with pytest.raises(ValueError, match=rf"c must be \({m},\) or \({n}, {m}\)"):
        native.rows_expand(u, p, torch.zeros(m + 1))


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_the_result_beyond_rounding(threads):
    if not native.available():
        pytest.skip("native thin passes unavailable on this CPU")
    z, u = torch.randn(1000, 200), torch.randn(1000, 9)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.cols_reduce(u, z)
    finally:
        torch.set_num_threads(before)
    assert _rel_err(got, u.double().t() @ z.double()) < 1e-5


def test_rank_limits_follow_the_instruction_set(each_isa):
    """AVX2 kernels take ranks up to 24 (expand: 16), where they still beat BLAS; AVX-512
    ones, twice as wide, up to 64 for both."""
    wide = each_isa == "avx512"
    assert native.max_rank() == (native.MAX_RANK_AVX512 if wide else native.MAX_RANK)
    want = native.MAX_RANK_AVX512 if wide else native.MAX_EXPAND_RANK
    assert native.max_rank(expand=True) == want
    big = torch.randn(128, 16)
    assert native.usable(big, rank=want, expand=True)
    assert not native.usable(big, rank=want + 1, expand=True)


def test_usable_only_for_plain_contiguous_float32_token_matrices():
    ok = native.available()
    big = torch.randn(128, 16)
    assert native.usable(big, rank=8) == ok
    assert not native.usable(big, rank=native.max_rank() + 1)  # BLAS is faster there
    assert native.usable(big, rank=native.max_rank(expand=True), expand=True) == ok
    assert not native.usable(big, rank=native.max_rank(expand=True) + 1, expand=True)
    assert not native.usable(big.double(), rank=8)
    assert not native.usable(big.t(), rank=8)  # not contiguous
    assert not native.usable(big[:, :8], rank=8)  # a column slice
    assert not native.usable(torch.randn(native.MIN_TOKENS - 1, 16), rank=8)
    assert not native.usable(torch.randn(2, 64, 16), rank=8)  # not a matrix
    assert not native.usable(big, big.double(), rank=8)  # every tensor must qualify


def _run_in_subprocess(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_native
def test_instruction_set_chosen_by_environment():
    """``TENSADAPT_NATIVE_ISA=avx2`` keeps the AVX2 kernels on any CPU; an unknown value
    switches the kernels off with a status that names the valid ones."""
    code = "from tensadapt import native; print(native.available(), native.isa())"
    res = _run_in_subprocess(code, TENSADAPT_NATIVE_ISA="avx2")
    assert res.returncode == 0, res.stderr
    if res.stdout.split()[0] == "True":
        assert res.stdout.split()[1] == "avx2"
    code = "from tensadapt import native; print(native.available()); print(native.status())"
    res = _run_in_subprocess(code, TENSADAPT_NATIVE_ISA="sse")
    assert res.returncode == 0, res.stderr
    flag, reason = res.stdout.strip().split("\n")
    assert flag == "False"
    assert reason == "TENSADAPT_NATIVE_ISA='sse': expected 'auto', 'avx2' or 'avx512'"


def test_use_isa_rejects_unknown_sets():
    with pytest.raises(ValueError, match=r"use_isa: expected one of \['avx2', 'avx512'\]"):
        native.use_isa("neon")


def test_switched_off_by_environment():
    res = _run_in_subprocess(
        "from tensadapt import native; print(native.available())", TENSADAPT_NATIVE="0"
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_failed_build_falls_back_to_pytorch(tmp_path):
    """A compiler that fails leaves ``available()`` False and the low-rank path working."""
    code = (
        "import torch; from tensadapt import native, low_rank\n"
        "x, a = torch.randn(200, 32), torch.randn(4, 32)\n"
        "h = low_rank.rank_activations(x, a, 1)\n"
        "assert torch.allclose(h, x @ a.t(), atol=1e-5)\n"
        "print(native.available())"
    )
    res = _run_in_subprocess(code, CC="false", TENSADAPT_CACHE=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
    assert not list(tmp_path.glob("*.so"))  # no half-written library left behind


@needs_native
def test_build_is_cached_per_source(tmp_path):
    code = "from tensadapt import native; print(native.available(), native._build())"
    first = _run_in_subprocess(code, TENSADAPT_CACHE=str(tmp_path))
    assert first.returncode == 0, first.stderr
    libs = list(tmp_path.glob("thin_passes-*.so"))
    assert len(libs) == 1 and str(libs[0]) in first.stdout
    mtime = libs[0].stat().st_mtime_ns
    again = _run_in_subprocess(code, TENSADAPT_CACHE=str(tmp_path))
    assert again.returncode == 0 and libs[0].stat().st_mtime_ns == mtime


@needs_native
@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("with_mix", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_low_rank_linear_same_with_and_without_native(
    fold, k, with_mix, with_bias, monkeypatch, native_off, each_isa
):
    """Every input gradient of :class:`LowRankLinear` (float32, 96 tokens) with the native
    passes, in each instruction set, equals the PyTorch path's to float32 rounding."""
    from tensadapt import low_rank

    if not fold:
        monkeypatch.setattr(low_rank, "FOLD_DTYPES", ())
    n, d_in, d_out, r, r2 = 96, 24, 72, 8, 5  # 72 output rows: the fold runs natively too
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, d_in, generator=g).requires_grad_()
    w = torch.randn(d_out, d_in, generator=g)
    b = torch.randn(d_out, generator=g).requires_grad_() if with_bias else None
    a = torch.randn(r, d_in // k, generator=g).requires_grad_()
    mix = torch.randn(r2, k * r, generator=g).requires_grad_() if with_mix else None
    bm = torch.randn(d_out, r2 if with_mix else k * r, generator=g).requires_grad_()
    gy = torch.randn(n, d_out, generator=g)
    leaves = [t for t in (x, b, a, mix, bm) if t is not None]

    def run():
        for t in leaves:
            t.grad = None
        out = LowRankLinear.apply(x, None, w, b, a, bm, 0.0, k, mix)
        out.backward(gy)
        return out.detach(), [t.grad.clone() for t in leaves]

    expands: list[int] = []
    fused: list[int] = []
    real, real_grads = native.rows_expand, native.factor_grads
    monkeypatch.setattr(native, "rows_expand", lambda *t: expands.append(1) or real(*t))
    monkeypatch.setattr(
        native, "factor_grads", lambda *t, **kw: fused.append(1) or real_grads(*t, **kw)
    )
    fast = run()
    # b + h Bᵀ and gh A (kept apart), or the fold W + B A (one input chunk)
    assert bool(expands) == (not fold or k == 1)
    # a plain folded B A, bias trained or not: every gradient from one read of x and gy
    assert bool(fused) == (fold and k == 1 and not with_mix)
    with native_off():
        slow = run()
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-4, atol=1e-4)
    for got, want in zip(fast[1], slow[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@needs_native
def test_native_passes_are_used_in_a_float32_step(monkeypatch):
    """A float32 CaRA step on a tiny ViT runs the native passes (the factor and bias
    gradients in one read of x and gy, and the fold), and its gradients equal the PyTorch
    path's."""
    if not native.available():
        pytest.skip("native thin passes unavailable on this CPU")
    torch.manual_seed(0)
    model = tiny_vit(dim=32, heads=4).train()
    am = ta.get_adapter_model(model, ta.presets.get("cara", rank=8, dropout=0.0)).train()
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(24, 3, 16, 16)  # 24 images x 5 tokens = 120 rows per map

    calls: list[str] = []
    for name in ("rows_times", "cols_reduce", "grad_pass", "factor_grads", "rows_expand"):
        real = getattr(native, name)
        monkeypatch.setattr(
            native, name, lambda *a, _f=real, _n=name, **kw: calls.append(_n) or _f(*a, **kw)
        )

    def grads():
        am.zero_grad()
        am(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}

    fast = grads()
    assert {"factor_grads", "rows_expand"} <= set(calls)
    state, native._state = native._state, "off"
    try:
        calls.clear()
        slow = grads()
    finally:
        native._state = state
    assert not calls
    for key in fast:
        torch.testing.assert_close(fast[key], slow[key], rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("train_bias", [True, False])
def test_shared_input_node_same_with_and_without_native(
    shared, train_bias, native_off, monkeypatch
):
    """Outputs and gradients equal the PyTorch path's, and every member's ``gy`` meets the one
    native pass that gives all factor and bias gradients from one read of ``x`` and every
    ``gy`` (shared ``A`` or not, biases trained or frozen)."""
    if not native.available():
        pytest.skip("native thin passes unavailable on this CPU")
    n, d, r, outs = 80, 32, 8, (32, 16, 16)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=g).requires_grad_()
    ws = [torch.randn(o, d, generator=g) for o in outs]
    biases = [torch.randn(o, generator=g).requires_grad_(train_bias) for o in outs]
    a_list = [torch.randn(r, d, generator=g).requires_grad_() for _ in outs]
    b_list = [torch.randn(o, r, generator=g).requires_grad_() for o in outs]
    gys = [torch.randn(n, o, generator=g) for o in outs]
    used_a = a_list[:1] if shared else a_list
    leaves = [x, *(biases if train_bias else []), *used_a, *b_list]

    def run():
        for t in leaves:
            t.grad = None
        ys = SharedInputLowRank.apply(x, shared, *ws, *biases, *a_list, *b_list)
        torch.autograd.backward(ys, gys)
        return [y.detach() for y in ys], [t.grad.clone() for t in leaves]

    passes: list[int] = []
    real_pass, real_grads = native.grad_pass, native.factor_grads

    def factor_grads(x, gys, *rest, **kw):
        passes.extend(gy.shape[1] for gy in gys)
        return real_grads(x, gys, *rest, **kw)

    monkeypatch.setattr(
        native, "grad_pass", lambda gy, *a: passes.append(-gy.shape[1]) or real_pass(gy, *a)
    )
    monkeypatch.setattr(native, "factor_grads", factor_grads)
    fast = run()
    assert sorted(passes) == sorted(outs)  # no separate gy B and hᵀ gy pass
    with native_off():
        slow = run()
    for got, want in zip(fast[0] + fast[1], slow[0] + slow[1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
