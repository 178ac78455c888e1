"""Presets, method by method: FacT-TK's clean MLP cores (and its reference-reshape flag), each
method's initialisation and scale, where its dropout acts, and no-op + training for the
TensLoRA and CaRA variants that ``test_presets.py`` does not train."""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch
from conftest import assert_noop_then_trains, tiny_vit

import tensadapt as ta
from tensadapt import presets
from tensadapt.errors import ConfigError
from tensadapt.low_rank import keep_scale

F64 = dict(adapter_dtype="float64")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here runs tiny models on one thread (see conftest.one_thread)."""


def _tiny(dim=16, heads=2, depth=2, **kw):
    torch.manual_seed(0)
    return tiny_vit(dim=dim, heads=heads, depth=depth, **kw).double().eval()


@torch.no_grad()
def _randomise(am, std=0.3):
    for p in am.tensor_adapters.parameters():
        p.normal_(0, std)


# --------------------------------------------------------------------------------- FacT-TK
def _fact_tk_blocks(g, layer):
    """``M[a, b, j] = Σ_k C[a, b, k] P[k, 12l + j]``: the 12 r×r cores of one block, with a
    the U (input) rank and b the V (output) rank (tensadapt stores C as ``core[k, a, b]``)."""
    p = getattr(g, "factor_depth*qkv*slices")[12 * layer : 12 * layer + 12]
    return torch.einsum("kab,jk->abj", g.core, p)


def _dw(g, sigma):
    """``ΔW[o, i] = Σ_ab V[o, b] Σ[a, b] U[i, a]``."""
    return g.factor_out @ sigma.t() @ g.factor_in.t()


def _fact_tk_expected(g, layer, d, scale, reference=False):
    """Dense updates of one block's qkv, proj, fc1, fc2, written from the maths: the clean
    Tucker form, or (``reference``) the reference code's un-permuted reshape of the MLP cores."""
    m = _fact_tk_blocks(g, layer)
    r = m.shape[0]
    qkv = torch.cat([_dw(g, m[:, :, j]) for j in range(3)])
    proj = _dw(g, m[:, :, 3])
    if not reference:
        fc1 = torch.cat([_dw(g, m[:, :, 4 + t]) for t in range(4)])  # output slices
        fc2 = torch.cat([_dw(g, m[:, :, 8 + t]) for t in range(4)], dim=1)  # input slices
    else:
        # (r, r, 4) -> (r, 4r) without a permute: column t·r + c is M[a, (t·r+c)//4, (t·r+c)%4]
        k1 = m[:, :, 4:8].reshape(r, 4 * r)
        k2 = m[:, :, 8:12].reshape(r, 4 * r)
        fc1 = torch.cat([_dw(g, k1[:, t * r : (t + 1) * r]) for t in range(4)])
        # fc2: x_t U (rank c) meets column t·r + c; C's first mode meets V
        fc2 = torch.cat(
            [g.factor_out @ k2[:, t * r : (t + 1) * r] @ g.factor_in.t() for t in range(4)], dim=1
        )
    return {"attn.qkv": qkv, "attn.proj": proj, "mlp.fc1": fc1, "mlp.fc2": fc2}, d * scale


def test_fact_tk_mlp_cores_are_the_clean_tucker_form():
    """Every slice, MLP ones included, is ``Σ_s = C ×₃ P[:, s]`` with C bound to U, V, P alike;
    the reference code's reshape gives different fc1/fc2 updates from the same factors."""
    d, scale = 16, 2.5
    am = ta.get_adapter_model(_tiny(dim=d), presets.get("fact_tk", rank=3, scale=scale, **F64))
    _randomise(am)
    g = am.tensor_adapters["g0"]
    with torch.no_grad():
        for layer in range(2):
            clean, _ = _fact_tk_expected(g, layer, d, scale)
            quirk, _ = _fact_tk_expected(g, layer, d, scale, reference=True)
            for name, expected in clean.items():
                got = am.delta_weight(f"blocks.{layer}.{name}")
                torch.testing.assert_close(got, scale * expected)
            for name in ("mlp.fc1", "mlp.fc2"):
                assert not torch.allclose(clean[name], quirk[name], atol=1e-3), name
            # attention cores need no reshape: the two readings agree there
            torch.testing.assert_close(clean["attn.qkv"], quirk["attn.qkv"])


def test_fact_tk_reference_reshape_flag_is_documented_and_refused():
    assert presets.get("fact_tk", reference_mlp_reshape=False) == presets.get("fact_tk")
    with pytest.raises(ConfigError, match=r"reference_mlp_reshape=True\) is not implemented"):
        presets.get("fact_tk", reference_mlp_reshape=True)
    with pytest.raises(ConfigError, match=r"without a permute.*\(t·r\+c\) // 4"):
        presets.fact_tk(rank=8, reference_mlp_reshape=True)
    assert "reference_mlp_reshape" in presets.fact_tk.__doc__


# ------------------------------------------------------------------------ initialisation
@pytest.fixture(scope="module")
def vit_b_meta():
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False)


def _real_adapter(model, name, **kw):
    """The preset's adapter on ViT-B (meta base model, real factors on the CPU)."""
    torch.manual_seed(0)
    return ta.get_adapter_model(model, presets.get(name, **kw), device="cpu")


def _orthonormal(t):
    """Columns orthonormal (n ≥ r) or rows orthonormal (n < r)."""
    g = t.t() @ t if t.shape[0] >= t.shape[1] else t @ t.t()
    return torch.allclose(g, torch.eye(g.shape[0]), atol=1e-5)


def _zero_and_nonzero(tensor, zero):
    named = dict(tensor.named_parameters())
    assert zero in named, (zero, list(named))
    assert torch.count_nonzero(named[zero]) == 0, zero
    for n, p in named.items():
        if n != zero:
            assert torch.count_nonzero(p) == p.numel(), n  # no other factor starts at zero


CARA_ZERO = {  # the d_in factor of the q/k/v tensor (the second factor of the default)
    4: "factor_in",
    5: "factor_in",
    3: "factor_in",
    2: "factor_in*out",
}


@pytest.mark.parametrize("modes", [4, 5, 3, 2])
def test_cara_init(vit_b_meta, modes):
    r = 8
    am = _real_adapter(vit_b_meta, "cara", rank=r, modes=modes)
    try:
        g0, g1 = am.tensor_adapters["g0"], am.tensor_adapters["g1"]
        if modes == 4:  # the second factor of each tensor: d_in (tensor 1), P2 (tensor 2)
            assert g0.axes[1] == "in" and g1.axes[1] == "out"
        _zero_and_nonzero(g0, CARA_ZERO[modes])
        _zero_and_nonzero(g1, "factor_out")
        for g in (g0, g1):  # λ: trainable, ones by default
            assert g.weights.requires_grad and torch.equal(g.weights, torch.ones(r))
            assert "weights" in dict(g.named_parameters())
        # layer/slice factors xavier-normal: std sqrt(2 / (n + R)); the others orthogonal
        # (modes=5: the 3×R role factor too, as the reference's dim_experiment.py)
        structural = [n for n in dict(g0.named_parameters()) if "depth" in n]
        for g, names in ((g0, structural), (g1, ["factor_depth*qkv*slices"])):
            for name in names:
                f = getattr(g, name)
                assert not _orthonormal(f), name
                if f.numel() >= 100:
                    expected = math.sqrt(2.0 / (f.shape[0] + r))
                    assert abs(f.std().item() / expected - 1) < 0.25, name
        others = {"factor_heads", "factor_out", "factor_qkv"} & set(dict(g0.named_parameters()))
        for name in others:
            assert _orthonormal(getattr(g0, name)), name
        assert _orthonormal(g1.factor_in)
        biases = dict(am.tensor_adapters["g1_bias"].named_parameters())
        assert {n: tuple(b.shape) for n, b in biases.items()} == {
            "bias_o": (768,),
            "bias_fc1": (3072,),
            "bias_fc2": (768,),
        }
        assert all(torch.count_nonzero(b) == 0 and b.requires_grad for b in biases.values())
    finally:
        am.unload()


def test_cara_lambda_can_be_drawn_per_task(vit_b_meta):
    am = _real_adapter(vit_b_meta, "cara", rank=64, lambda_mean=2.0, lambda_std=0.5)
    try:
        for key in ("g0", "g1"):
            w = am.tensor_adapters[key].weights
            assert w.requires_grad
            assert abs(w.mean().item() - 2.0) < 0.3 and 0.3 < w.std().item() < 0.7
    finally:
        am.unload()


@pytest.mark.parametrize(
    "name,kwargs,zero",
    [
        ("fact_tt", dict(rank=8), "core_out"),  # V
        ("fact_tk", dict(rank=8), "factor_out"),  # V
        ("lotr", dict(rank=8), "core_depth*qkv"),  # the M_i
        ("lorta", dict(rank=8), "factor_in"),  # B (r × d_h)
        ("metatt", dict(rank=8), "core_out"),
    ],
)
def test_zero_factor_of_shared_tensor_presets(vit_b_meta, name, kwargs, zero):
    am = _real_adapter(vit_b_meta, name, **kwargs)
    try:
        _zero_and_nonzero(am.tensor_adapters["g0"], zero)
        if name == "lotr":  # L and R Normal(0, 1)
            for core in ("core_in", "core_out"):
                assert abs(getattr(am.tensor_adapters["g0"], core).std().item() - 1) < 0.05
        if name == "lorta":  # A (d × r) as the reference: U(±1/√r)
            a = am.tensor_adapters["g0"].factor_out
            assert a.abs().max() <= 1 / math.sqrt(8) and a.abs().max() > 0.9 / math.sqrt(8)
    finally:
        am.unload()


@pytest.mark.parametrize("variant", ["att", "qkv_depth", "att_qkv_depth"])
def test_tenslora_tucker_init(vit_b_meta, variant):
    am = _real_adapter(vit_b_meta, "tenslora", variant=variant, rank=4)
    try:
        for g in am.tensor_adapters.values():
            _zero_and_nonzero(g, "core")
            for n, f in g.named_parameters():
                if n != "core":
                    assert _orthonormal(f), n
            assert not list(g.named_buffers())
    finally:
        am.unload()


@pytest.mark.parametrize("variant", ["att", "qkv_depth", "att_qkv_depth"])
def test_tenslora_cp_init_and_fixed_weights(variant):
    """CP: the first (d_in) factor zero; λ a buffer of ones that training never changes."""
    torch.manual_seed(0)
    am = ta.get_adapter_model(
        tiny_vit(dim=16, heads=2),
        presets.get("tenslora", variant=variant, rank=3, factorization="cp", modules_to_save=[]),
    )
    for g in am.tensor_adapters.values():
        assert g.axes[0] == "in"
        _zero_and_nonzero(g, "factor_in")
        assert "weights" not in dict(g.named_parameters())
        assert torch.equal(dict(g.named_buffers())["weights"], torch.ones(3))
    before = {k: v.clone() for k, v in am.tensor_adapters.state_dict().items()}
    opt = torch.optim.SGD([p for p in am.parameters() if p.requires_grad], lr=0.1)
    am.train()
    am(torch.randn(4, 3, 16, 16)).square().mean().backward()
    opt.step()
    after = am.tensor_adapters.state_dict()
    for k in before:
        if k.endswith(".weights"):
            assert torch.equal(after[k], before[k]), k
        elif k.endswith(".factor_in"):
            assert not torch.equal(after[k], before[k]), k  # the zero factor trains


def test_lora_init(vit_b_meta):
    am = _real_adapter(vit_b_meta, "lora", rank=8)
    try:
        for key, g in am.tensor_adapters.items():
            assert torch.count_nonzero(g.lora_B) == 0, key
            bound = 1 / math.sqrt(768)  # kaiming-uniform(a=√5) on (r, in): U(±1/√in)
            assert 0.9 * bound < g.lora_A.abs().max() <= bound, key
    finally:
        am.unload()


# ---------------------------------------------------------------------------------- scale
def test_cara_scale_is_a_scalar_not_alpha_over_rank():
    """``delta_weight(qkv)[h·d_h + e, i] = s · T1[3l + k, i, h, e]`` for any rank."""
    for rank in (2, 5):
        am = ta.get_adapter_model(
            _tiny(dim=16, heads=2), presets.get("cara", rank=rank, scale=3.0, **F64)
        )
        _randomise(am)
        with torch.no_grad():
            t1 = am.tensor_adapters["g0"].reconstruct()  # (3L, in, H, d_h)
            for layer in range(2):
                dw = am.delta_weight(f"blocks.{layer}.attn.qkv").view(3, 2, 8, 16)
                for k in range(3):
                    expected = 3.0 * t1[3 * layer + k].permute(1, 2, 0)
                    torch.testing.assert_close(dw[k], expected)


@pytest.mark.parametrize(
    "name,kwargs,scale",
    [
        ("lora", dict(rank=4, alpha=16.0), 4.0),  # α / r
        ("lora", dict(rank=4), 1.0),  # no α: 1
        ("lorta", dict(rank=4, alpha=2.0), 0.5),
        ("lotr", dict(rank=4, alpha=2.0), 0.5),  # scale / r
        ("fact_tt", dict(rank=4, scale=7.0), 7.0),  # a scalar
        ("tenslora", dict(variant="qkv", rank=2), 1.0),  # scaling 1
    ],
)
def test_scale_values(name, kwargs, scale):
    """``s`` recovered from ``delta_weight`` against the factors, written out per method."""
    am = ta.get_adapter_model(_tiny(dim=16, heads=2), presets.get(name, **kwargs, **F64))
    _randomise(am)
    t = am.tensor_adapters
    with torch.no_grad():
        if name == "lora":  # q of block 1: B A
            expected = t["g0_l1_q"].lora_B @ t["g0_l1_q"].lora_A
            got = am.delta_weight("blocks.1.attn.qkv")[:16]
        elif name == "lotr":  # v of block 1 is target n = 3 of [q0, v0, q1, v1]: L M_3 R
            g = t["g0"]
            m = getattr(g, "core_depth*qkv")[:, 3, :]
            expected = g.core_out[:, :, 0].t() @ m.t() @ g.core_in[0].t()
            got = am.delta_weight("blocks.1.attn.qkv")[32:]
        elif name == "fact_tt":  # proj of block 1 is slice 12 + 3: V Σ U
            g = t["g0"]
            sigma = getattr(g, "core_depth*qkv*slices")[:, 15, :]
            expected = g.core_out[:, :, 0].t() @ sigma.t() @ g.core_in[0].t()
            got = am.delta_weight("blocks.1.attn.proj")
        elif name == "lorta":  # o of block 1: concat_h A diag(C_h[h] C_m[o] C_l[1]) B
            g = t["g0"]
            coef = g.factor_qkv[3] * g.factor_depth[1]
            expected = torch.cat(
                [
                    g.factor_out @ torch.diag(g.factor_heads[h] * coef) @ g.factor_in.t()
                    for h in (0, 1)
                ],
                dim=1,
            )
            got = am.delta_weight("blocks.1.attn.proj")
        else:  # TensLoRA qkv: T[in, out, role] of block 1's tensor
            tensor = t["g0_l1"].reconstruct()
            expected = torch.cat([tensor[:, :, k].t() for k in range(3)])
            got = am.delta_weight("blocks.1.attn.qkv")
        torch.testing.assert_close(got, scale * expected)


# --------------------------------------------------------------------------------- dropout
def _effective_delta(layer, n_copies=2):
    """``s·ΔW`` as the layer applies it in one forward: feed the identity (``n_copies``
    stacked, one forward) and subtract the frozen map; returns one matrix per copy."""
    eye = torch.eye(layer.base_layer.in_features, dtype=torch.float64)
    x = torch.cat([eye] * n_copies)
    with torch.no_grad():
        y = layer(x) - layer.base_layer(x)
    return [c.t() for c in y.chunk(n_copies)]


@pytest.mark.parametrize("module", ["blocks.0.attn.qkv", "blocks.1.mlp.fc1"])
def test_cara_dropout_is_dropconnect_on_delta_w(module):
    """In training, CaRA's ΔW has exact zeros at about p of its entries (the others are
    ``ΔW/(1-p′)``, ``p′`` within 2⁻¹⁷ of p), one mask per forward shared by every token,
    redrawn each forward."""
    p = 0.1
    am = ta.get_adapter_model(_tiny(dim=32, heads=4), presets.get("cara", rank=4, **F64))
    with torch.no_grad():  # random factors, biases left at zero
        for n, t in am.tensor_adapters.named_parameters():
            if "bias" not in n:
                t.normal_(0, 0.3)
    layer = am.adapted_layers[module]
    full = am.delta_weight(module).detach()
    assert torch.count_nonzero(full) == full.numel()
    torch.testing.assert_close(_effective_delta(layer)[0], full)  # eval: no dropout
    am.train()
    torch.manual_seed(0)
    d1, d1b = _effective_delta(layer)
    torch.testing.assert_close(d1, d1b, rtol=0, atol=0)  # same mask for every token
    zeros = d1 == 0
    assert abs(zeros.double().mean().item() - p) < 0.03
    torch.testing.assert_close(d1[~zeros], full[~zeros] * keep_scale(p))  # 1 / (1 - p′)
    # scattered entries, not whole inputs (input dropout) or outputs
    assert not zeros.all(0).any() and not zeros.all(1).any()
    torch.manual_seed(1)
    d2 = _effective_delta(layer)[0]
    assert not torch.equal(d1, d2)
    torch.manual_seed(0)
    assert torch.equal(_effective_delta(layer)[0], d1)


def _input_factor(name, g):
    """U (d × r): the factor x meets first."""
    return (g.factor_in if name == "fact_tk" else g.core_in[0]).detach()


@pytest.mark.parametrize("strategy", ["contract", "materialise"])
@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_fact_dropout_acts_on_rank_activations(name, strategy):
    """Per token, the training-mode update is ``B diag(m) Uᵀ x / (1-p)`` for a 0/1 mask m of
    length r (``ΔW = B Uᵀ``): rank-r activations dropped, one mask per token — not input
    dropout, not DropConnect — on both forward strategies."""
    p, r, n_tokens = 0.5, 4, 40
    am = ta.get_adapter_model(
        _tiny(dim=16, heads=2),
        presets.get(name, rank=r, dropout=p, strategy=strategy, **F64),
    )
    _randomise(am)
    u = _input_factor(name, am.tensor_adapters["g0"])
    torch.manual_seed(5)
    x = torch.randn(n_tokens, 16, dtype=torch.float64)
    for module in ("blocks.0.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1"):
        layer = am.adapted_layers[module]
        b = am.delta_weight(module).detach() @ torch.linalg.pinv(u.t())
        am.train()
        with torch.no_grad():
            dy = layer(x) - layer.base_layer(x)
        am.eval()
        masks = []
        for n in range(n_tokens):
            cols = b * (u.t() @ x[n]) / (1 - p)  # column j: B[:, j] (Uᵀx)_j / (1-p)
            m = torch.linalg.lstsq(cols, dy[n].unsqueeze(1)).solution.squeeze(1)
            torch.testing.assert_close(cols @ m, dy[n])
            torch.testing.assert_close(m, m.round(), atol=1e-6, rtol=0)
            assert set(m.round().tolist()) <= {0.0, 1.0}
            masks.append(m.round())
        masks = torch.stack(masks)
        assert 0.35 < (masks == 0).double().mean().item() < 0.65, module
        assert len({tuple(m.tolist()) for m in masks}) > 4, module  # redrawn per token


@pytest.mark.parametrize("strategy", ["contract", "materialise"])
@pytest.mark.parametrize("name", ["fact_tt", "fact_tk"])
def test_fact_fc2_rank_dropout_masks_each_input_slice(name, strategy):
    """fc2 is cut into 4 input slices: the update is ``Σ_t B_t diag(m_t) Uᵀ x_t / (1-p)``
    with one 0/1 mask per (slice, rank) — whichever forward strategy runs."""
    p, r, n_tokens = 0.5, 2, 8
    am = ta.get_adapter_model(
        _tiny(dim=16, heads=2),
        presets.get(name, rank=r, dropout=p, strategy=strategy, **F64),
    )
    _randomise(am)
    u = _input_factor(name, am.tensor_adapters["g0"])
    module = "blocks.1.mlp.fc2"
    layer = am.adapted_layers[module]
    dw = am.delta_weight(module).detach()
    bs = [dw[:, t * 16 : (t + 1) * 16] @ torch.linalg.pinv(u.t()) for t in range(4)]
    torch.manual_seed(5)
    x = torch.randn(n_tokens, 64, dtype=torch.float64)
    am.train()
    with torch.no_grad():
        dy = layer(x) - layer.base_layer(x)
    candidates = torch.tensor(list(itertools.product([0.0, 1.0], repeat=4 * r)), dtype=dy.dtype)
    for n in range(n_tokens):
        xs = x[n].view(4, 16)
        cols = torch.cat([bs[t] * (u.t() @ xs[t]) for t in range(4)], dim=1) / (1 - p)
        err = (candidates @ cols.t() - dy[n]).abs().max(dim=1).values
        assert err.min() < 1e-9, (n, err.min().item())


# ------------------------------------------------------------ no-op at init, then training
VARIANTS = [
    ("tenslora", dict(variant=v, factorization=f, rank=2))
    for f in ("tucker", "cp")
    for v in ("att", "qkv", "depth", "att_qkv_depth")
] + [("cara", dict(modes=m, rank=2)) for m in (5, 3, 2)]


@pytest.mark.parametrize(
    "name,kwargs", VARIANTS, ids=[f"{n}-{'-'.join(map(str, k.values()))}" for n, k in VARIANTS]
)
def test_variants_noop_at_init_and_train(name, kwargs):
    torch.manual_seed(0)
    model = tiny_vit(dim=16, heads=2, num_classes=4).eval()
    x = torch.randn(8, 3, 16, 16)
    y = torch.randint(0, 4, (8,))
    assert_noop_then_trains(model, presets.get(name, modules_to_save=[], **kwargs), x, y)
