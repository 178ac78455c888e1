"""DropConnect on ``ΔW``: the hashed keep mask and :class:`DropConnectLinear`, against dense
maths, an independent scalar hash, and the general path."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vit
from test_low_rank_path import assert_path_matches_general_path

import tensadapt as ta
from tensadapt import drop_connect as dc
from tensadapt import native
from tensadapt.low_rank import keep_scale, quantised_p

CPU = torch.device("cpu")
KEYS = [(0, 0), (0x12345678, 0x9ABCDEF0), (0xFFFFFFFF, 1)]


def scalar_hash(e: int, key: tuple[int, int]) -> int:
    """The finaliser in plain Python integers: the oracle for both implementations."""

    def f(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    return f(f(e ^ key[0]) ^ key[1])


def torch_mask(numel: int, p: float, key: tuple[int, int]) -> torch.Tensor:
    """The PyTorch form of the mask, whether or not the native library is loaded."""
    e = torch.arange(numel, dtype=torch.int64)
    return (dc._mix(dc._mix(e ^ key[0]) ^ key[1]) >> 16) >= dc.threshold(p)


@pytest.mark.parametrize("key", KEYS)
def test_torch_hash_matches_the_scalar_oracle(key):
    entries = [0, 1, 7, 8, 255, 65_536, 2**31 - 1, 2**31, 2**32 - 1]
    e = torch.tensor(entries, dtype=torch.int64)
    got = dc._mix(dc._mix(e ^ key[0]) ^ key[1])
    assert got.tolist() == [scalar_hash(v, key) for v in entries]


def needs_native_lib():
    if not native.available():
        pytest.skip(f"native passes unavailable: {native.status()}")


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_native_mask_kernels_match_the_torch_mask(key, p):
    """``keep_bytes``, ``drop_grad_`` and ``drop_fold`` all draw the same mask as the PyTorch
    form, including the scalar tails (numel not a multiple of 8)."""
    needs_native_lib()
    numel, t = 8 * 1301 + 5, dc.threshold(p)
    want = torch_mask(numel, p, key)
    assert torch.equal(native.keep_bytes(numel, t, key).bool(), want)
    g = native.drop_grad_(torch.ones(numel), 2.5, t, key)
    assert torch.equal(g, want.float() * 2.5)
    rows, cols = 97, 13  # cols: one 8-wide strip and a tail of 5
    w = torch.zeros(rows, cols)
    a, b = torch.ones(1, cols), torch.ones(rows, 1)
    folded = native.drop_fold(w, a, b, 1.0, t, key)
    assert torch.equal(folded.bool(), torch_mask(rows * cols, p, key).view(rows, cols))


@pytest.mark.parametrize(
    "n, rows, cols, r",
    [(2080, 1152, 384, 8), (70, 384, 1536, 8), (100, 37, 29, 3), (65, 130, 200, 20), (33, 9, 8, 1)],
)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 1.0])
def test_drop_factor_grads_match_the_dense_oracle(n, rows, cols, r, p, each_isa):
    """``drop_factor_grads`` = ``c·Bᵀ(m ⊙ gyᵀ x)``, ``c·(m ⊙ gyᵀ x)Aᵀ`` and ``1ᵀ gy`` in
    float64, for both orientations (taller and wider matrices), token counts off the chunk
    size, widths off the 8-lane and column-block sizes, and no or every entry dropped; the
    thin passes inside it in each instruction set."""
    gen = torch.Generator().manual_seed(n + rows)
    gy, x = torch.randn(n, rows, generator=gen), torch.randn(n, cols, generator=gen)
    a, b = torch.randn(r, cols, generator=gen), torch.randn(rows, r, generator=gen)
    key, c = (0x2468ACE0, 0x13579BDF), 1.25
    keep = torch_mask(rows * cols, p, key).view(rows, cols)
    full = c * (gy.double().t() @ x.double())
    g = full * keep
    ga, gb, gbias = native.drop_factor_grads(gy, x, a, b, c, dc.threshold(p), key, True)
    wants = (b.double().t() @ g, g @ a.double().t(), gy.double().sum(0))
    # the kept share is the unmasked product minus the dropped share: rounding scales with
    # the unmasked product (at p = 1 the result is 0 up to that rounding)
    scales = (b.double().t() @ full, full @ a.double().t(), wants[2])
    for got, want, scale in zip((ga, gb, gbias), wants, scales):
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() <= 1e-5 * max(scale.abs().max(), 1.0)
    assert native.drop_factor_grads(gy, x, a, b, c, dc.threshold(p), key, False)[2] is None


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_drop_factor_grads_split_rows_over_any_thread_count(threads):
    """The dropped entries' rows are split among the threads by entry count, the thin passes
    take the token chunks in turn: any thread count (more threads than chunks, ranges whose
    rows hold no drops) gives the dense oracle's gradients."""
    needs_native_lib()
    gen = torch.Generator().manual_seed(threads)
    n, rows, cols, r, p = 100, 300, 41, 4, 0.02  # 4 chunks; many rows without a drop
    gy, x = torch.randn(n, rows, generator=gen), torch.randn(n, cols, generator=gen)
    a, b = torch.randn(r, cols, generator=gen), torch.randn(rows, r, generator=gen)
    key = (0x0F1E2D3C, 0x4B5A6978)
    g = gy.double().t() @ x.double() * torch_mask(rows * cols, p, key).view(rows, cols)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ga, gb, gbias = native.drop_factor_grads(gy, x, a, b, 1.0, dc.threshold(p), key, True)
    finally:
        torch.set_num_threads(before)
    full = (gy.double().t() @ x.double()).abs()
    for got, want, scale in (
        (ga, b.double().t() @ g, b.double().abs().t() @ full),
        (gb, g @ a.double().t(), full @ a.double().abs().t()),
        (gbias, gy.double().sum(0), gy.double().abs().sum(0)),
    ):
        assert ((got.double() - want).abs() <= 1e-5 * scale + 1e-6).all()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_hashed_mask_law(p):
    """Bernoulli(1 − p′): the kept fraction within 5 σ; neighbours along rows and along
    columns agree as often as independence predicts; two keys give independent masks."""
    torch.manual_seed(0)
    shape = (300, 400)
    m = dc.hashed_keep_mask(shape, p, dc.draw_key(), CPU)
    n, q = m.numel(), quantised_p(p)
    assert abs(m.double().mean().item() - (1 - q)) < 5 * (q * (1 - q) / n) ** 0.5
    agree = q * q + (1 - q) * (1 - q)
    tol = 5 * (agree * (1 - agree) / n) ** 0.5
    for same in (
        m[:, 1:] == m[:, :-1],
        m[1:] == m[:-1],
        m == dc.hashed_keep_mask(shape, p, dc.draw_key(), CPU),
    ):
        assert abs(same.double().mean().item() - agree) < tol


def test_hashed_mask_follows_the_seed_and_not_the_thread_count():
    torch.manual_seed(5)
    first = dc.hashed_keep_mask((64, 129), 0.3, dc.draw_key(), CPU)
    threads = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            torch.manual_seed(5)
            assert torch.equal(dc.hashed_keep_mask((64, 129), 0.3, dc.draw_key(), CPU), first)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(dc.hashed_keep_mask((64, 129), 0.3, dc.draw_key(), CPU), first)


def test_mask_larger_than_its_counter_is_refused():
    with pytest.raises(ValueError, match=r"at most 2\*\*32 entries.*4295098368"):
        dc.hashed_keep_mask((65_536, 65_538), 0.1, torch.tensor([1, 2]), CPU)


def dense(x, w, bias, a, bm, p, key):
    """The oracle: ``x (W + c·(m ⊙ B A))ᵀ + bias`` in autograd on dense tensors."""
    m = torch_mask(w.numel(), p, key).view(w.shape).to(w.dtype)
    out = x @ (w + keep_scale(p) * m * (bm @ a)).t()
    return out if bias is None else out + bias


@pytest.mark.parametrize("with_bias", [True, False])
def test_drop_connect_linear_gradcheck_and_dense_oracle(with_bias):
    torch.manual_seed(0)
    n, d_in, d_out, r, p, key = 6, 5, 7, 3, 0.4, torch.tensor([11, 22])
    x = torch.randn(n, d_in, dtype=torch.float64, requires_grad=True)
    w = torch.randn(d_out, d_in, dtype=torch.float64)
    bias = torch.randn(d_out, dtype=torch.float64, requires_grad=True) if with_bias else None
    a = torch.randn(r, d_in, dtype=torch.float64, requires_grad=True)
    bm = torch.randn(d_out, r, dtype=torch.float64, requires_grad=True)
    mask = torch_mask(w.numel(), p, key)
    assert 0 < mask.sum() < mask.numel()  # some entries dropped, some kept
    inputs = (x, w, bias, a, bm, p, key)
    assert torch.autograd.gradcheck(lambda *t: dc.DropConnectLinear.apply(*t), inputs)
    got = dc.DropConnectLinear.apply(*inputs)
    want = dense(*inputs)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    leaves = [t for t in (x, bias, a, bm) if t is not None]
    g = torch.randn_like(got)
    for mine, ref in zip(torch.autograd.grad(got, leaves, g), torch.autograd.grad(want, leaves, g)):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(64, 8), (67, 13), (1152, 384), (96, 1537)])
@pytest.mark.parametrize("r", [1, 8, 13])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_native_and_pytorch_forms_agree_with_float64(shape, r, p, native_off):
    """Float32 with native code, float32 without it, and the float64 oracle: same output and
    gradients to float32 rounding, under the same mask. At ``p = 0.1`` the native factor
    gradients go through the dropped entries' sums, at ``0.5`` through the dense masked
    gradient."""
    needs_native_lib()
    d_out, d_in = shape
    gen = torch.Generator().manual_seed(r)
    x = torch.randn(80, d_in, generator=gen).requires_grad_()
    w = torch.randn(d_out, d_in, generator=gen) * 0.1
    bias = torch.randn(d_out, generator=gen).requires_grad_()
    a = torch.randn(r, d_in, generator=gen).requires_grad_()
    bm = torch.randn(d_out, r, generator=gen).requires_grad_()
    key = torch.tensor([99, 7])
    gy = torch.randn(80, d_out, generator=gen)
    leaves = (x, bias, a, bm)
    assert dc._native_ok(w, a.detach(), bm.detach())
    assert dc.sparse_ok(p) == (p < 0.25)

    def run():
        out = dc.DropConnectLinear.apply(x, w, bias, a, bm, p, key)
        return [out, *torch.autograd.grad(out, leaves, gy)]

    fast = run()
    with native_off():
        slow = run()
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, w, bias, a, bm)]
    ref_out = dense(*ref_inputs, p, key)
    ref_leaves = [ref_inputs[i] for i in (0, 2, 3, 4)]
    ref = [ref_out, *torch.autograd.grad(ref_out, ref_leaves, gy.double())]
    for got_fast, got_slow, want in zip(fast, slow, ref):
        scale = want.abs().max()
        assert (got_fast.double() - want).abs().max() <= 2e-5 * scale
        assert (got_slow.double() - want).abs().max() <= 2e-5 * scale


def cara_model(dim: int, dtype: torch.dtype):
    torch.manual_seed(0)
    model = tiny_vit(dim=dim, heads=2).to(dtype)
    name = "float64" if dtype == torch.float64 else "float32"
    cfg = ta.presets.get("cara", rank=2, adapter_dtype=name)  # default dropout: DropConnect
    am = ta.get_adapter_model(model, cfg).train()
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    return am


def test_cara_training_takes_the_drop_connect_path_and_matches_the_general_path():
    am = cara_model(16, torch.float64)
    taken = []

    def spy(path):
        def run(*args):
            taken.append(path(*args))
            return taken[-1]

        return run

    for layer in am.adapted_layers.values():
        layer.__dict__["_forward_drop_connect"] = spy(layer._forward_drop_connect)

    def every_layer_took_it():
        assert len(taken) == len(am.adapted_layers)
        assert all(out is not None for out in taken)

    assert_path_matches_general_path(am, "_forward_drop_connect", after=every_layer_took_it)


@pytest.mark.parametrize("sparse", [True, False])
def test_cara_float32_step_runs_native_and_matches_pytorch(sparse, monkeypatch, native_off):
    """Widths of 64 and more reach the native passes: the fold, then for the factor
    gradients either the dropped entries' sums (CaRA's ``p = 0.1``) or the masked dense
    gradient (drop rates above :data:`~tensadapt.drop_connect.SPARSE_MAX_P`)."""
    needs_native_lib()
    if not sparse:
        monkeypatch.setattr(dc, "SPARSE_MAX_P", 0.0)
    am = cara_model(64, torch.float32)
    calls = {"drop_fold": 0, "drop_grad_": 0, "drop_factor_grads": 0}
    for fn in calls:
        real = getattr(native, fn)
        monkeypatch.setattr(
            native, fn, lambda *a, f=real, k=fn: calls.__setitem__(k, calls[k] + 1) or f(*a)
        )
    x = torch.randn(16, 3, 16, 16)  # 80 tokens: enough for the native passes

    def run():
        am.zero_grad()
        torch.manual_seed(3)
        out = am(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}

    fast_out, fast_grads = run()
    layers = len(am.adapted_layers)
    assert calls["drop_fold"] == layers
    assert (calls["drop_factor_grads"], calls["drop_grad_"]) == (
        (layers, 0) if sparse else (0, layers)
    )
    with native_off():
        slow_out, slow_grads = run()
    torch.testing.assert_close(fast_out, slow_out, rtol=1e-4, atol=1e-4)
    for key, grad in fast_grads.items():
        torch.testing.assert_close(
            grad, slow_grads[key], rtol=1e-3, atol=1e-3 * grad.abs().max().item()
        )


def test_eval_mode_draws_no_mask():
    """In eval DropConnect is off: the low-rank path runs and the generator is not touched."""
    am = cara_model(16, torch.float64).eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.manual_seed(1)
    am(x)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(1), after)


@pytest.mark.parametrize("family", ["timm_vit", "hf_bert", "hf_llama_gqa", "hf_gpt2"])
def test_drop_connect_path_on_each_family_matches_the_general_path(family):
    """Fused qkv (timm), separate q/k/v (BERT, grouped-query LLaMA) and GPT-2's ``Conv1D``
    (weight stored ``in × out``): every adapted module takes the one-node path in training,
    with the outputs and factor gradients of the general path under the same masks. (A fused
    qkv module needs the ``qkv`` mode to hold one contribution; with three it folds.)"""
    from families import make

    model, inputs, output = make(family)
    fused = family in ("timm_vit", "hf_gpt2")
    cfg = ta.TensorAdapterConfig(
        factorization="cp",
        modes=["depth", "qkv"] if fused else ["depth"],
        targets=["q", "k", "v"],
        rank=2,
        dropout=0.3,
        dropout_on="delta",
        adapter_dtype="float64",
    )
    am = ta.get_adapter_model(model.double(), cfg).train()
    with torch.no_grad():
        for p in am.tensor_adapters.parameters():
            p.normal_()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    taken = []

    def run():
        am.zero_grad()
        torch.manual_seed(11)
        out = output(am(**inputs))
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in am.tensor_adapters.named_parameters()}
        return out.detach(), grads

    for layer in am.adapted_layers.values():
        path = layer._forward_drop_connect
        layer.__dict__["_forward_drop_connect"] = lambda *a, f=path: (
            taken.append(f(*a)) or taken[-1]
        )
    fast_out, fast_grads = run()
    assert len(taken) == len(am.adapted_layers) and all(t is not None for t in taken)
    for layer in am.adapted_layers.values():
        layer.__dict__["_forward_drop_connect"] = lambda *a: None
    slow_out, slow_grads = run()
    torch.testing.assert_close(fast_out, slow_out, rtol=0, atol=1e-10)
    for key, grad in fast_grads.items():
        torch.testing.assert_close(grad, slow_grads[key], rtol=1e-9, atol=1e-10)


def test_cara_training_compiles_fullgraph():
    """The key is a tensor drawn with ``torch.randint`` and the mask is hashed in PyTorch ops
    while compiling, so a DropConnect training step traces as one graph."""
    am = cara_model(16, torch.float32)
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(am, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = compiled(x)
    torch.manual_seed(5)
    want = am(x)
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    assert all(p.grad is not None for p in am.tensor_adapters.parameters())


# ---------------------------------------------------------------- the PyTorch form (GPU path)


class AtenCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops dispatched inside the block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def total(self, skip_views: bool = True) -> int:
        views = {"t", "view", "select", "detach", "alias", "expand", "transpose"}
        return sum(n for k, n in self.ops.items() if not (skip_views and k in views))


HASH_OPS = {"bitwise_xor", "bitwise_and", "__rshift__", "rshift", "bitwise_right_shift"}


@pytest.mark.parametrize("c", [0x7FEB352D, 0x846CA68B, 1, 2**32 - 1, 2**31, 2**31 - 1])
def test_mul32_is_the_product_mod_2_32(c):
    """The two-op product (signed residue, then the low 32 bits) is ``x·c mod 2³²`` for the
    largest operands, where the plain int64 product would overflow."""
    xs = [0, 1, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 0xDEADBEEF]
    got = dc._mul32(torch.tensor(xs, dtype=torch.int64), c)
    assert got.tolist() == [(x * c) % 2**32 for x in xs]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_pytorch_mask_matches_the_scalar_oracle(key, p, native_off):
    """The PyTorch mask (what runs off the CPU kernels) keeps entry ``e`` exactly when the
    scalar oracle's ``h(e) >> 16`` reaches ``round(p·2¹⁶)``, for counters across all 32 bits."""
    shape = (3, 1000)
    with native_off():
        m = dc.hashed_keep_mask(shape, p, torch.tensor(key), CPU).flatten()
    for e in list(range(0, 3000, 7)) + [2999]:
        want = (scalar_hash(e, key) >> 16) >= round(p * 2**16)
        assert bool(m[e]) == want, e
    # counters near 2³², through the counter form itself
    e = torch.tensor([2**32 - 1, 2**32 - 2, 2**31], dtype=torch.int64)
    got = dc._keep_from_counters(e, dc.threshold(p), torch.tensor(key))
    assert got.tolist() == [(scalar_hash(v, key) >> 16) >= dc.threshold(p) for v in e.tolist()]


def dc_inputs(dtype: torch.dtype, seed: int = 0, shape=(70, 48, 96, 8)):
    gen = torch.Generator().manual_seed(seed)
    n, d_in, d_out, r = shape
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    w = torch.randn(d_out, d_in, generator=gen, dtype=dtype) * 0.1
    bias = torch.randn(d_out, generator=gen, dtype=dtype)
    a = torch.randn(r, d_in, generator=gen, dtype=dtype)
    bm = torch.randn(d_out, r, generator=gen, dtype=dtype)
    gy = torch.randn(n, d_out, generator=gen, dtype=dtype)
    return [x, w, bias, a, bm], gy


def run_dc(tensors, gy, p, key):
    x, w, bias, a, bm = [t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    out = dc.DropConnectLinear.apply(x, w, bias, a, bm, p, key)
    leaves = (x, bias, a, bm)
    return [out, *torch.autograd.grad(out, leaves, gy)]


def dense_oracle(tensors, gy, p, key):
    """Output and gradients of ``x (W + c·(m ⊙ B A))ᵀ + b`` in float64 autograd."""
    x, w, bias, a, bm = [t.detach().double().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    out = dense(x, w, bias, a, bm, p, key)
    return [out, *torch.autograd.grad(out, (x, bias, a, bm), gy.double())]


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("autocast", [False, True])
def test_pytorch_form_matches_the_dense_oracle(p, autocast, native_off):
    """Float32 on the PyTorch form (the kernels off), with and without an enclosing bf16
    autocast (the function runs in its inputs' dtype): output and the gradients of ``x``,
    ``bias``, ``A`` and ``B`` equal the float64 oracle's to float32 rounding, under the same
    mask in both passes."""
    tensors, gy = dc_inputs(torch.float32, seed=int(p * 10))
    key = torch.tensor([0x0BADF00D, 0xC0FFEE])
    with native_off(), ta.gemm.use_backend("blas"):
        assert not dc._native_ok(tensors[1], tensors[3], tensors[4])
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = run_dc(tensors, gy, p, key)
        else:
            got = run_dc(tensors, gy, p, key)
    want = dense_oracle(tensors, gy, p, key)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert (g.double() - w).abs().max() <= 2e-5 * w.abs().max()


def test_pytorch_form_in_bfloat16_matches_the_dense_oracle(native_off):
    """Operands cast to bfloat16 by the caller (as the engine does under autocast): the
    function computes in bfloat16, within bfloat16 rounding of the float64 oracle."""
    tensors, gy = dc_inputs(torch.float32, seed=3)
    half = [t.bfloat16() for t in tensors]
    key = torch.tensor([5, 6])
    with native_off():
        got = run_dc(half, gy.bfloat16(), 0.1, key)
    want = dense_oracle(half, gy.bfloat16(), 0.1, key)
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        assert (g.double() - w).abs().max() <= 3e-2 * w.abs().max()


def test_pytorch_form_is_a_handful_of_ops_with_one_mask_draw(native_off):
    """One DropConnect module's forward + backward off the CPU kernels, counted with a
    dispatch mode: the mask is hashed once (22 ops over ``out × in``, in the forward), the
    backward only multiplies by it. 31 kernels in all (views not counted) against 94 when
    both passes hashed it."""
    tensors, gy = dc_inputs(torch.float32)
    x, w, bias, a, bm = [t.clone().requires_grad_(i != 1) for i, t in enumerate(tensors)]
    key = dc.draw_key()
    with native_off(), ta.gemm.use_backend("blas"):
        with AtenCounter() as fwd:
            out = dc.DropConnectLinear.apply(x, w, bias, a, bm, 0.1, key)
        with AtenCounter() as bwd:
            out.backward(gy)
    assert all(t.grad is not None for t in (x, bias, a, bm))
    assert not HASH_OPS & set(bwd.ops), bwd.ops  # no second draw
    assert bwd.total() <= 6, bwd.ops  # gx, gyᵀx, the mask, gB, gA, gbias
    assert fwd.total() <= 26, fwd.ops  # B A, the hash (22), the fold, the product
    assert fwd.total() + bwd.total() <= 32


def test_cara_layer_under_bf16_autocast_matches_the_dense_oracle(native_off):
    """A CaRA model trained under ``torch.autocast("cpu", bfloat16)`` with the kernels off:
    each adapted module's output is ``x (W + c·(m ⊙ s·ΔW))ᵀ + b`` with the mask of the key
    drawn at its call, within bfloat16 rounding of the float64 oracle, and every factor gets
    a finite float32 gradient."""
    am = cara_model(16, torch.float32)
    name, layer = next(iter(am.adapted_layers.items()))
    x = torch.randn(2, 5, 16)
    with native_off(), ta.gemm.use_backend("blas"):
        torch.manual_seed(21)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x)
        got.float().square().sum().backward()
        torch.manual_seed(21)
        key = dc.draw_key()
    p = ta.presets.get("cara", rank=2).dropout  # the preset's DropConnect rate
    w = layer.weight_out_in().detach().double()
    delta = am.delta_weight(name).detach().double()
    m = torch_mask(w.numel(), p, key).view(w.shape).double()
    want = x.double() @ (w + keep_scale(p) * m * delta).t() + layer.bias.detach().double()
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() <= 3e-2 * want.abs().max()
    grads = [q.grad for q in am.tensor_adapters.parameters() if q.requires_grad]
    assert any(g is not None for g in grads)
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads if g is not None)
