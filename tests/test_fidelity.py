"""``presets.get(name, reference=True)`` against the official code's initialisation law.

Every check compares a statistic of the factors tensadapt draws with the law the reference
code draws them from (written out here from the reference, not read from the presets):
which factor is zero, the bound and standard deviation of uniform draws, the standard
deviation of normal draws, orthogonality. Tolerances are a few standard errors of the
statistic for the factor's number of entries. LoRTA's first AdamW step is compared with a
plain-torch re-implementation of the reference parameterisation on RoBERTa-base shapes.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from conftest import tiny_vit
from torch import nn

import tensadapt as ta
from tensadapt import presets
from tensadapt.errors import ConfigError

D, L, H = 768, 12, 12


@pytest.fixture(scope="module")
def vit_b_meta():
    with torch.device("meta"):
        return timm.create_model("vit_base_patch16_224", pretrained=False)


def _tensors(model, name, **kw):
    torch.manual_seed(0)
    am = ta.get_adapter_model(model, presets.get(name, reference=True, **kw), device="cpu")
    tensors = {k: dict(t.named_parameters()) for k, t in am.tensor_adapters.items()}
    am.unload()
    return tensors


def _zero(t: torch.Tensor) -> bool:
    return torch.count_nonzero(t).item() == 0


def _uniform(t: torch.Tensor, bound: float) -> None:
    """``t`` ~ U(±bound): every entry inside, the largest near the bound, std = bound/√3.

    For n entries the largest |x| falls below ``(1 - 10/n)·bound`` with probability
    ``(1 - 10/n)^n ≈ e^-10``; the sample std has relative standard error ``√(0.8/n)/2``.
    """
    n = t.numel()
    a = t.detach().abs()
    assert a.max().item() <= bound * (1 + 1e-6), (a.max().item(), bound)
    assert a.max().item() >= bound * (1 - 10 / n), (a.max().item(), bound)
    _std(t, bound / math.sqrt(3.0), kurtosis=1.8)


def _std(t: torch.Tensor, expected: float, kurtosis: float = 3.0) -> None:
    """Sample std within 5 standard errors of ``expected`` (zero-mean law)."""
    n = t.numel()
    rel = 5 * math.sqrt((kurtosis - 1) / n) / 2
    got = t.detach().pow(2).mean().sqrt().item()
    assert abs(got / expected - 1) < rel, (got, expected, rel)


def _orthonormal(t: torch.Tensor) -> bool:
    g = t.t() @ t if t.shape[0] >= t.shape[1] else t @ t.t()
    return torch.allclose(g, torch.eye(g.shape[0]), atol=1e-5)


# ----------------------------------------------------------------------------- per preset
def test_lora_reference(vit_b_meta):
    """PEFT: A (r×in) kaiming_uniform_(a=√5), fan_in = in; B zero; lora_alpha 8."""
    r = 8
    cfg = presets.get("lora", reference=True, rank=r)
    assert cfg.effective_scale() == 8 / r
    t = _tensors(vit_b_meta, "lora", rank=r)
    first = next(iter(t.values()))
    assert _zero(first["lora_B"])
    _uniform(first["lora_A"], 1 / math.sqrt(D))


def test_lorta_reference(vit_b_meta):
    """ihounie/lorta: A (d×r) kaiming_uniform_(a=√5) → U(±1/√r); C_h, C_m, C_l
    kaiming_uniform_(a=0) → U(±√(6/r)); B (r×d_h) zero; lora_alpha 8."""
    r = 8
    t = _tensors(vit_b_meta, "lorta", rank=r)["g0"]
    assert _zero(t["factor_in"])
    _uniform(t["factor_out"], 1 / math.sqrt(r))
    c = torch.cat([t["factor_heads"], t["factor_qkv"], t["factor_depth"]])
    _uniform(c, math.sqrt(6 / r))
    assert presets.get("lorta", reference=True, rank=r).effective_scale() == 8 / r
    # the default draws the same law (only the scale differs: α is the user's)
    default = presets.get("lorta", rank=r).to_dict()
    assert default["init"] == presets.get("lorta", reference=True, rank=r).to_dict()["init"]


@pytest.mark.parametrize("modes", [4, 5])
def test_cara_reference(vit_b_meta, modes):
    """BonnBytes/CaRA: layer factors xavier_normal_ (std √(2/(n+R))), the d_in / P2 factors
    zero, the rest orthogonal (modes=5: the 3×R role factor too); λ ones for μ=1, σ=0."""
    r = 8
    t = _tensors(vit_b_meta, "cara", rank=r, modes=modes)
    g0, g1 = t["g0"], t["g1"]
    assert _zero(g0["factor_in"]) and _zero(g1["factor_out"])
    layer = g0["factor_depth*qkv"] if modes == 4 else g0["factor_depth"]
    _std(torch.cat([layer.flatten(), layer.flatten()]), math.sqrt(2 / (layer.shape[0] + r)))
    _std(g1["factor_depth*qkv*slices"], math.sqrt(2 / (9 * L + r)))
    ortho = [g0["factor_heads"], g0["factor_out"], g1["factor_in"]]
    if modes == 5:
        ortho.append(g0["factor_qkv"])
    assert all(_orthonormal(f) for f in ortho)
    for g in (g0, g1):
        assert torch.equal(g["weights"], torch.ones(r))


def test_cara_lambda_follows_reference():
    """λ ~ Normal(μ, σ): μ alone gives σ = 0 (the reference's most common setting), not 1."""
    only_mean = presets.get("cara", lambda_mean=1.3)
    init = only_mean.groups[0].init
    assert init["weights"] == "normal" and init["weights_mean"] == 1.3
    assert init["weights_std"] == 0.0
    spread = presets.get("cara", lambda_mean=1.5, lambda_std=0.1).groups[1].init
    assert spread["weights_std"] == 0.1
    with pytest.raises(ConfigError, match="lambda_std"):
        presets.get("cara", lambda_std=-0.1)


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
def test_tenslora_reference(vit_b_meta, factorization):
    """ax-le/TensLoRA: every tensor seeded identically (all start equal), Tucker core zero /
    CP first factor zero, factors orthogonal; heads interleaved (C-order unfold)."""
    cfg = presets.get("tenslora", reference=True, variant="att", factorization=factorization)
    assert cfg.heads_layout == "interleaved"
    t = _tensors(vit_b_meta, "tenslora", variant="att", rank=4, factorization=factorization)
    assert len(t) == 3 * L
    first = next(iter(t.values()))
    for params in t.values():
        for name, p in params.items():
            assert torch.equal(p, first[name]), name
    zero = "core" if factorization == "tucker" else "factor_in"
    assert _zero(first[zero])
    assert all(_orthonormal(p) for n, p in first.items() if n != zero)
    # the default draws every tensor independently
    torch.manual_seed(0)
    am = ta.get_adapter_model(vit_b_meta, presets.get("tenslora", variant="att"), device="cpu")
    a, b = list(am.tensor_adapters.values())[:2]
    assert not torch.equal(a.factor_out, b.factor_out)
    am.unload()


def test_seeded_init_leaves_global_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with torch.device("meta"):
        model = tiny_vit(dim=16, heads=2)
    cfg = presets.get("tenslora", reference=True, variant="qkv", rank=2)
    before = torch.get_rng_state()
    ta.get_adapter_model(model, cfg, device="cpu").unload()
    after = torch.get_rng_state()
    assert torch.equal(before, after)
    torch.set_rng_state(before)
    assert expected.shape == torch.rand(3).shape


def test_fact_tt_reference_factors(vit_b_meta):
    """JieShibo/PETL-ViT fact_tt.py: U = nn.Linear(768, r) → U(±1/√768); V zero."""
    r = 8
    g = _tensors(vit_b_meta, "fact_tt", rank=r)["g0"]
    assert _zero(g["core_out"])
    _uniform(g["core_in"], 1 / math.sqrt(D))


def test_fact_tt_reference_cores_per_projection():
    """The cores as the reference draws them: q, k, v, o ``nn.Linear(r, r)`` and fc1
    ``nn.Linear(r, 4r)`` → U(±1/√r); fc2 ``nn.Linear(4r, r)`` → U(±1/√(4r)). Read back
    from each module's ΔW (Σ_t = V⁺ ΔW_t (Uᵀ)⁺), so no slice numbering is assumed."""
    r, d, depth = 8, 32, 4
    torch.manual_seed(0)
    model = tiny_vit(depth=depth, dim=d, heads=4)
    am = ta.get_adapter_model(model, presets.get("fact_tt", reference=True, rank=r))
    g = am.tensor_adapters["g0"]
    with torch.no_grad():
        g.core_out.normal_()  # V (r × d), zero at init: any full-rank V reads the cores back
    u = g.core_in.detach()[0]  # (d, r)
    v = g.core_out.detach()[:, :, 0]  # (r, d)
    u_pinv, v_pinv = torch.linalg.pinv(u), torch.linalg.pinv(v)
    cores: dict[str, list[torch.Tensor]] = {"attn": [], "fc1": [], "fc2": []}
    for blk in range(depth):
        qkv = am.delta_weight(f"blocks.{blk}.attn.qkv").detach()
        proj = am.delta_weight(f"blocks.{blk}.attn.proj").detach()
        fc1 = am.delta_weight(f"blocks.{blk}.mlp.fc1").detach()
        fc2 = am.delta_weight(f"blocks.{blk}.mlp.fc2").detach()
        # ΔW_t = s·Vᵀ Σ_tᵀ Uᵀ (out × in), s = 1: Σ_t = (V⁺ᵀ ΔW_t U⁺ᵀ)ᵀ
        cores["attn"] += [(v_pinv.t() @ w @ u_pinv.t()).t() for w in [*qkv.split(d, 0), proj]]
        cores["fc1"] += [(v_pinv.t() @ w @ u_pinv.t()).t() for w in fc1.split(d, 0)]
        cores["fc2"] += [(v_pinv.t() @ w @ u_pinv.t()).t() for w in fc2.split(d, 1)]
    am.unload()
    _uniform(torch.stack(cores["attn"] + cores["fc1"]), 1 / math.sqrt(r))
    _uniform(torch.stack(cores["fc2"]), 1 / math.sqrt(4 * r))


def test_fact_tk_reference(vit_b_meta):
    """fact_tk.py: U nn.Linear(768, r); C (r×r×r) and P (r×144) xavier_uniform_; V zero."""
    r = 8
    g = _tensors(vit_b_meta, "fact_tk", rank=r)["g0"]
    assert _zero(g["factor_out"])
    _uniform(g["factor_in"], 1 / math.sqrt(D))
    _uniform(g["core"], math.sqrt(6 / (r * r + r * r)))
    _uniform(g["factor_depth*qkv*slices"], math.sqrt(6 / (12 * L + r)))


def test_lotr_reference(vit_b_meta):
    """daskol/lotr lotr.py: L, R normal_() (std 1), M zero; scale = scale / r."""
    g = _tensors(vit_b_meta, "lotr", rank=8)["g0"]
    assert _zero(g["core_depth*qkv"])
    _std(g["core_in"], 1.0)
    _std(g["core_out"], 1.0)
    assert presets.get("lotr", reference=True, rank=8, alpha=2.0).effective_scale() == 2 / 8


@pytest.mark.parametrize("name", ["metatt", "serial_lora", "cara", "lotr"])
def test_reference_is_default_where_nothing_differs(name):
    assert presets.get(name, reference=True).to_dict() == presets.get(name).to_dict()


@pytest.mark.parametrize(
    "name,override",
    [
        ("fact_tt", dict(targets=["q", "v"])),
        ("lorta", dict(init={"zero": "out"})),
        ("tenslora", dict(heads_layout="semantic")),
        ("tenslora", dict(interleaved_heads=False)),
        ("cara", dict(dropout_on="input")),
    ],
)
def test_reference_refuses_contradicting_overrides(name, override):
    with pytest.raises(ConfigError, match="reference"):
        presets.get(name, reference=True, **override)


def test_reference_keeps_hyperparameters_free():
    cfg = presets.get("fact_tt", reference=True, rank=4, scale=10.0, dropout=0.2)
    assert (cfg.rank, cfg.scale, cfg.dropout) == (4, 10.0, 0.2)
    with pytest.raises(ConfigError, match="True or False"):
        presets.get("lora", reference="yes")


# ------------------------------------------------------- LoRTA: the first AdamW step
def _frozen_linear() -> nn.Linear:
    lin = nn.utils.skip_init(nn.Linear, D, D)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    return lin


class _Encoder(nn.Module):
    """RoBERTa-base's adapted shapes: 12 blocks of q, k, v, o (768 × 768), 12 heads."""

    def __init__(self) -> None:
        super().__init__()
        # the frozen weights play no part in the adapter's gradients: skip their init
        self.blocks = nn.ModuleList(
            nn.ModuleDict({n: _frozen_linear() for n in ("q", "k", "v", "o")}) for _ in range(L)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [blk[n](x) for blk in self.blocks for n in ("q", "k", "v", "o")]


def _loss(outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    return sum((y * t).sum() for y, t in zip(outputs, targets))


def _reference_step(r: int, x: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
    """‖ΔW_q‖ (mean over blocks) after one AdamW step of the reference parameterisation:
    ``ΔW_{l,m}[:, h·d_h:(h+1)·d_h] = s·A diag(C_h[h] C_m[m] C_l[l]) B``, ``y += x ΔWᵀ``,
    A (d×r) kaiming_uniform_(a=√5), C kaiming_uniform_(a=0), B zero, s = α/r = 8/r.

    ``x ΔWᵀ = s·((x_h Bᵀ) ⊙ c_h summed over h) Aᵀ`` and ``‖ΔW‖² = Σ_h tr(AᵀA D_h B Bᵀ D_h)``
    with ``D_h = diag(c_h)``: nothing of size d × d is formed."""
    d_h = D // H
    a = nn.Parameter(torch.empty(D, r))
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    cs = []
    for n in (H, 4, L):
        c = nn.Parameter(torch.empty(n, r))
        nn.init.kaiming_uniform_(c, a=0.0)
        cs.append(c)
    c_h, c_m, c_l = cs
    b = nn.Parameter(torch.zeros(r, d_h))
    s = 8.0 / r
    xh = x.reshape(x.shape[0], H, d_h)
    outs = []
    for l_ in range(L):
        for m in range(4):
            c = c_h * c_m[m] * c_l[l_]  # (H, r)
            z = ((xh @ b.t()) * c).sum(1)  # (N, r)
            outs.append(s * z @ a.t())
    opt = torch.optim.AdamW([a, c_h, c_m, c_l, b], lr=lr)
    _loss(outs, targets).backward()
    opt.step()
    with torch.no_grad():
        ga, gb = a.t() @ a, b @ b.t()
        norms = []
        for l_ in range(L):
            c = c_h * c_m[0] * c_l[l_]
            sq = ((c @ (ga * gb.t())) * c).sum()
            norms.append(s * sq.clamp_min(0).sqrt())
        return torch.stack(norms).mean().item()


def _tensadapt_step(r: int, x: torch.Tensor, targets: torch.Tensor, lr: float) -> float:
    model = _Encoder()
    cfg = presets.get(
        "lorta",
        reference=True,
        rank=r,
        target_modules={m: rf"blocks\.\d+\.{m}$" for m in ("q", "k", "v", "o")},
        num_heads=H,
        modules_to_save=[],
    )
    am = ta.get_adapter_model(model, cfg)
    params = [p for p in am.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    loss = _loss(am(x), targets)  # the frozen part adds no gradient to the factors
    loss.backward()
    opt.step()
    with torch.no_grad():
        norms = [am.delta_weight(f"blocks.{i}.q").norm() for i in range(L)]
    am.unload()
    return torch.stack(norms).mean().item()


def test_lorta_first_adamw_step_matches_reference():
    """On RoBERTa-base shapes at r = 8 and lr 1e-3, the first step moves ΔW_q as much as
    the reference init does (within 20 %); each side averaged over 3 seeds (with one seed
    both draw their factors in the same order, so the draws coincide)."""
    r, lr, seeds = 8, 1e-3, 3
    ours, ref = [], []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(100 + seed)
        x = torch.randn(16, D, generator=g)
        targets = torch.randn(4 * L, 16, D, generator=g)
        torch.manual_seed(seed)
        ref.append(_reference_step(r, x, targets, lr))
        torch.manual_seed(seed)
        ours.append(_tensadapt_step(r, x, targets, lr))
    ratio = (sum(ours) / seeds) / (sum(ref) / seeds)
    assert 0.8 < ratio < 1.2, (ours, ref)
