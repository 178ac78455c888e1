"""Published methods as :class:`~tensadapt.config.TensorAdapterConfig` presets.

``get(name, **kw)`` returns the config; ``list()`` the names. Keyword arguments override any
config field (``targets``, ``dropout``, ``scale``, ...). Parameter counts below are for
ViT-B/16 (d = 768, L = 12, H = 12, d_h = 64) and are checked exactly by the test suite.

``get(name, reference=True, ...)`` returns the configuration that reproduces the method's
official code where tensadapt's default differs from it on purpose (initialisation law,
head layout, per-tensor seeding, scale); docs/methods.md lists every difference. With
``reference=True`` the fields that define that law (:data:`REFERENCE_FIELDS`) cannot be
overridden: such an override raises :class:`~tensadapt.errors.ConfigError`.
"""

from __future__ import annotations

import builtins
import inspect
import math
from collections.abc import Callable
from typing import Any

from .config import GROUP_FIELDS, TensorAdapterConfig
from .errors import ConfigError, UnknownNameError
from .roles import MLP_ROLES, ROLES, expand_roles

__all__ = [
    "get",
    "list",
    "register_preset",
    "PRESETS",
    "REFERENCE_FIELDS",
    "FACT_TT_CORE_GAINS",
    "TENSLORA_VARIANTS",
    "CARA_MODES",
]

#: config fields that ``reference=True`` fixes (the reference's factor network, init law,
#: dropout placement, layout and targets); overriding one of them with it is an error
REFERENCE_FIELDS = (
    "factorization",
    "modes",
    "targets",
    "init",
    "dropout_on",
    "orientation",
    "composition",
    "heads_layout",
    "heads_side",
    "bias",
    "factorization_options",
    "groups",
)

PRESETS: dict[str, Callable[..., TensorAdapterConfig]] = {}


def register_preset(name: str) -> Callable[[Callable[..., TensorAdapterConfig]], Callable]:
    """Register a function returning a TensorAdapterConfig under ``name``."""

    def decorator(fn: Callable[..., TensorAdapterConfig]) -> Callable[..., TensorAdapterConfig]:
        PRESETS[name] = fn
        return fn

    return decorator


def list() -> builtins.list[str]:  # noqa: A001 - the documented API name
    """Names of the registered presets."""
    return sorted(PRESETS)


def get(name: str, reference: bool = False, **kwargs: Any) -> TensorAdapterConfig:
    """The config of preset ``name``; ``kwargs`` are the preset's arguments or config fields.

    ``reference=True``: the official code's initialisation law, layout, seeding and scale
    (see the module docstring); overriding one of :data:`REFERENCE_FIELDS` then raises.
    """
    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; valid presets are: {', '.join(list())}")
    if not isinstance(reference, bool):
        raise ConfigError(f"reference must be True or False, got {reference!r}")
    fn = PRESETS[name]
    params = inspect.signature(fn).parameters
    own = {k: v for k, v in kwargs.items() if k in params}
    fields = {k: v for k, v in kwargs.items() if k not in params}
    if reference:
        fixed = sorted(k for k in fields if k in REFERENCE_FIELDS)
        if fixed:
            raise ConfigError(
                f"preset {name!r} with reference=True fixes {fixed} to the official code's "
                "values; drop the override, or use reference=False to change them"
            )
        own["reference"] = True
    config = fn(**own)
    if fields:
        data = config.to_dict()
        unknown = [k for k in fields if k not in data]
        if unknown:
            raise ConfigError(
                f"preset {name!r} got unknown arguments {unknown}; its arguments are "
                f"{sorted(params)}, and any TensorAdapterConfig field"
            )
        data.update(fields)
        if data.get("groups"):
            # top-level overrides reach every group (a group's own settings are its defaults);
            # ``targets`` is split: each group keeps the named roles it holds
            shared = {k: v for k, v in fields.items() if k in GROUP_FIELDS and k != "targets"}
            groups = [g | shared for g in data["groups"]]
            if "targets" in fields:
                groups = _split_targets(name, groups, fields["targets"])
            data["groups"] = groups
        config = TensorAdapterConfig.from_dict(data)
    return config


def _split_targets(
    name: str, groups: builtins.list[dict[str, Any]], targets: Any
) -> builtins.list[dict[str, Any]]:
    """Restrict each group of a grouped preset to the ``targets`` it holds; drop empty groups.

    A name (role or alias) goes whole to the group whose roles contain it (a group holding MLP
    roles takes either MLP form, so ``"mlp"`` or ``gate``/``up``/``down`` reach CaRA's second
    tensor); an alias that spans groups is cut into the roles each group holds. Raises if a name
    belongs to no group.
    """
    names = [targets] if isinstance(targets, str) else builtins.list(targets)
    # a group that holds the MLP holds it in either form (fc1/fc2 or gate/up/down)
    held = [set(expand_roles(g["targets"])) for g in groups]
    held = [h | set(MLP_ROLES) if h & set(MLP_ROLES) else h for h in held]
    picked: builtins.list[builtins.list[str]] = [[] for _ in groups]
    for target in names:
        roles = set(expand_roles([target]))
        whole = [i for i, h in enumerate(held) if roles <= h]
        if whole:
            picked[whole[0]].append(target)
            continue
        parts = [(i, [r for r in ROLES if r in roles & h]) for i, h in enumerate(held)]
        parts = [(i, rs) for i, rs in parts if rs]
        if not parts:
            owners = "; ".join(
                f"group {i}: {', '.join(g['targets'])}" for i, g in enumerate(groups)
            )
            raise ConfigError(
                f"preset {name!r}: target {target!r} is in none of its groups ({owners}); "
                "name roles those groups hold, or pass groups=[...] for other tensors"
            )
        for i, rs in parts:
            picked[i] += rs
    return [g | {"targets": t} for g, t in zip(groups, picked) if t]


def _scale_fields(alpha: float | None, scale: float | None) -> dict[str, float | None]:
    return {"alpha": alpha, "scale": scale}


@register_preset("lora")
def lora(
    rank: int = 8,
    targets: tuple[str, ...] = ("q", "v"),
    alpha: float | None = None,
    dropout: float = 0.0,
    reference: bool = False,
) -> TensorAdapterConfig:
    """LoRA (Hu et al. 2021; PEFT): ``ΔW = B A`` per target, B zero, A kaiming-uniform(√5).

    Params ``r·(in + out)`` per target; on q, v of ViT-B: ``r·1536·24``. Scale α/r (1 if no α).
    ``reference=True`` also takes PEFT's default α = 8 when ``alpha`` is None.
    """
    if reference and alpha is None:
        alpha = 8.0
    return TensorAdapterConfig(
        factorization="lora",
        rank=rank,
        targets=builtins.list(targets),
        alpha=alpha,
        dropout=dropout,
    )


CARA_MODES = {
    5: ["depth", "qkv", "in", "heads", "out"],
    4: ["depth*qkv", "in", "heads", "out"],
    3: ["depth*qkv", "in", "out"],
    2: ["depth*qkv", "in*out"],
}


@register_preset("cara")
def cara(
    rank: int = 8,
    modes: int = 4,
    scale: float = 1.0,
    dropout: float = 0.1,
    lambda_mean: float | None = None,
    lambda_std: float = 0.0,
    reference: bool = False,
) -> TensorAdapterConfig:
    """CaRA — Canonical Rank Adaptation (Veeramacheneni et al., ICML 2025; BonnBytes/CaRA).

    Two CP tensors with trainable weights λ, shared by all blocks:
    (1) q/k/v ``(L·3, d_in, H, d_h)`` (``modes`` 4; 5: ``(L, 3, d, H, d_h)``, 3:
    ``(L·3, d, d)``, 2: ``(L·3, d·d)``); (2) o + MLP slices ``(L·9, d, d)`` with the
    residual side last (fc2 read transposed) and three trainable biases (o, fc1, fc2) shared
    across blocks. The second factor of each tensor starts at zero, layer/slice factors
    xavier-normal (``modes=5``: the 3×R role factor orthogonal), the others orthogonal;
    λ ~ Normal(μ, σ) with μ = ``lambda_mean`` (1 if None) and σ = ``lambda_std`` (default 0,
    as most of the reference's per-task configs), i.e. ones by default. DropConnect on ΔW;
    a per-task scale s. Params (default): ``2526·R + 4608``. The default is the reference
    (``reference=True`` changes nothing).
    """
    del reference  # the default follows the official code (docs/methods.md, CaRA)
    if modes not in CARA_MODES:
        raise ConfigError(f"cara modes={modes!r} is invalid; valid: {sorted(CARA_MODES)}")
    if isinstance(lambda_std, bool) or not isinstance(lambda_std, (int, float)) or lambda_std < 0:
        raise ConfigError(f"cara lambda_std must be a number ≥ 0, got {lambda_std!r}")
    mean = 1.0 if lambda_mean is None else lambda_mean
    weights = (
        {"weights": "ones"}
        if mean == 1.0 and lambda_std == 0
        else {"weights": "normal", "weights_mean": mean, "weights_std": float(lambda_std)}
    )
    first = CARA_MODES[modes]
    layer_factors = [m for m in first if m in ("depth*qkv", "depth")]
    qkv_init = {
        "zero": "in",
        "method": "orthogonal",
        "methods": dict.fromkeys(layer_factors, "xavier_normal"),
        **weights,
    }
    mlp_init = {
        "zero": "out",
        "method": "orthogonal",
        "methods": {"depth*qkv*slices": "xavier_normal"},
        **weights,
    }
    common = dict(factorization="cp", factorization_options={"weights": "trainable"})
    return TensorAdapterConfig(
        rank=rank,
        scale=scale,
        dropout=dropout,
        dropout_on="delta",
        **common,
        groups=[
            dict(targets=["q", "k", "v"], modes=first, init=qkv_init, **common),
            dict(
                targets=["o", "fc1", "fc2"],
                modes=["depth*qkv*slices", "out", "in"],
                orientation="residual",
                bias=True,
                init=mlp_init,
                **common,
            ),
        ],
    )


TENSLORA_VARIANTS = {
    "att": ["in", "out", "heads"],
    "qkv": ["in", "out", "qkv"],
    "depth": ["in", "out", "depth"],
    "att_qkv": ["in", "out", "heads", "qkv"],
    "att_depth": ["in", "out", "heads", "depth"],
    "qkv_depth": ["in", "out", "qkv", "depth"],
    "att_qkv_depth": ["in", "out", "heads", "qkv", "depth"],
}


@register_preset("tenslora")
def tenslora(
    variant: str = "qkv_depth",
    rank: int | dict[str, int] = 4,
    factorization: str = "tucker",
    scale: float = 1.0,
    interleaved_heads: bool | None = None,
    reference: bool = False,
) -> TensorAdapterConfig:
    """TensLoRA (Marmoret et al., arXiv 2509.19391; ax-le/TensLoRA) on q, k, v.

    ``variant`` picks the tensorisation (att = heads on the output side); Tucker (default:
    core zero, factors orthogonal, per-mode ranks allowed) or CP (first, d_in, factor zero;
    weights fixed at ones). E.g. qkv_depth: one ``(d, d, 3, L)`` tensor,
    ``2rd + 3r + rL + r⁴`` params. ``interleaved_heads=True`` reproduces the reference
    code's C-order head unfold (output column ``j·H + h``) bit-exactly.

    ``reference=True``: interleaved heads, and every tensor drawn from a generator seeded
    with 0 (the reference seeds each tensor identically, so all its tensors start equal).
    """
    if reference and interleaved_heads is False:
        raise ConfigError(
            "tenslora(reference=True) uses the reference code's interleaved heads; "
            "interleaved_heads=False contradicts it"
        )
    interleaved = bool(interleaved_heads) or reference
    if variant not in TENSLORA_VARIANTS:
        raise ConfigError(
            f"tenslora variant={variant!r} is invalid; valid: {', '.join(TENSLORA_VARIANTS)}"
        )
    if factorization not in ("tucker", "cp"):
        raise ConfigError(f"tenslora factorization={factorization!r}; valid: tucker, cp")
    init: dict[str, Any] = {"zero": "core" if factorization == "tucker" else "in"}
    if reference:
        init["seed"] = 0
    extra: dict[str, Any] = {"init": init}
    if factorization == "cp":
        extra["factorization_options"] = {"weights": "fixed"}
    return TensorAdapterConfig(
        factorization=factorization,
        modes=TENSLORA_VARIANTS[variant],
        rank=rank,
        scale=scale,
        targets=["q", "k", "v"],
        heads_layout="interleaved" if interleaved else "semantic",
        **extra,
    )


FACT_TARGETS = ["q", "k", "v", "o", "fc1", "fc2"]
#: the gain of each of a block's 12 FacT-TT cores in the reference law U(±g/√r): q, k, v, o
#: and fc1's four slices are ``nn.Linear(r, ·)`` (fan_in r), fc2's ``nn.Linear(4r, r)``
#: (fan_in 4r, so g = 1/2)
FACT_TT_CORE_GAINS = [1.0] * 8 + [0.5] * 4


@register_preset("fact_tt")
def fact_tt(
    rank: int = 8, scale: float = 1.0, dropout: float = 0.1, reference: bool = False
) -> TensorAdapterConfig:
    """FacT-TT (Jie & Deng, AAAI 2023; JieShibo/PETL-ViT).

    One tensor ``(L·12, d, d)`` over q, k, v, o, fc1 (4 slices), fc2 (4 slices) of every
    block: ``ΔW_s = V Σ_s U`` with U (d×r) and V (r×d, zero) shared and a free r×r core per
    slice — a Tensor-Train over ``[in, slice, out]``. Dropout on the rank-r activations.
    Params ``1536r + 144r²``. U and Σ orthogonal by default.

    ``reference=True``: the reference's ``nn.Linear`` init, U ~ U(±1/√d) and
    Σ_s ~ U(±1/√r) (fc2's slices U(±1/√(4r)), its core being one ``4r → r`` map).
    """
    init: dict[str, Any] = {"zero": "out"}
    if reference:
        init |= {
            "methods": {"in": "kaiming_uniform", "depth*qkv*slices": "uniform_rank"},
            "gains": {"depth*qkv*slices": FACT_TT_CORE_GAINS},
        }
    return TensorAdapterConfig(
        factorization="tt",
        modes=["in", "depth*qkv*slices", "out"],
        rank=rank,
        scale=scale,
        targets=builtins.list(FACT_TARGETS),
        init=init,
        dropout=dropout,
        dropout_on="rank",
    )


@register_preset("fact_tk")
def fact_tk(
    rank: int = 32,
    scale: float = 1.0,
    dropout: float = 0.1,
    reference_mlp_reshape: bool = False,
    reference: bool = False,
) -> TensorAdapterConfig:
    """FacT-TK (Jie & Deng, AAAI 2023): the same tensor as FacT-TT in Tucker form.

    ``Σ_s = C ×₃ P[:, s]`` with core C (r×r×r) and slice factor P; U, V (zero) shared.
    Params ``1536r + 144r + r³``. This is the clean Tucker form for every slice, MLP ones
    included: fc1's output slice t and fc2's input slice t use ``Σ_{12l+4+t}`` and
    ``Σ_{12l+8+t}``, with C's modes bound to U, V, P as for q, k, v, o.

    ``reference_mlp_reshape=True`` asks for the reference code's MLP cores, which reshape the
    ``(r, r, 4)`` stack ``M = C ×₃ P[:, slices]`` to ``r × 4r`` without a permute: fc1's
    output slice t, rank column c reads ``M[a, ⌊(t·r+c)/4⌋, (t·r+c) mod 4]`` (fc2 likewise,
    with C's first mode bound to V instead of U). The engine cannot express that, so it
    raises :class:`~tensadapt.errors.ConfigError` (see docs/methods.md).

    ``reference=True``: the reference's init, U ~ U(±1/√d) (``nn.Linear``), C and P
    xavier-uniform (C: U(±√3/r); P, r×12L: U(±√(6/(12L + r)))), V zero; U, C, P are
    orthogonal by default. The MLP cores keep the clean Tucker form (see above).
    """
    init: dict[str, Any] = {"zero": "out"}
    if reference:
        init["methods"] = {
            "in": "kaiming_uniform",
            "core": "xavier_uniform",
            "depth*qkv*slices": "xavier_uniform",
        }
    if reference_mlp_reshape:
        raise ConfigError(
            "fact_tk(reference_mlp_reshape=True) is not implemented: the reference code builds "
            "the fc1/fc2 cores by reshaping M = C ×₃ P[:, 4 slices] from (r, r, 4) to (r, 4r) "
            "without a permute, so in slice t (fc1: output, fc2: input) the rank column c "
            "reads M[a, (t·r+c) // 4, (t·r+c) % 4] (and for fc2 C's first mode meets V, not U). "
            "One slice then mixes all four rows of P with C's second mode, which no mapping "
            "of slice coordinates onto a single Tucker factor network (each tensor axis on one "
            "factor, shared by every slice) can reproduce. Use the default clean Tucker form "
            "(same parameters and count); see docs/methods.md, FacT"
        )
    return TensorAdapterConfig(
        factorization="tucker",
        modes=["depth*qkv*slices", "in", "out"],
        rank=rank,
        scale=scale,
        targets=builtins.list(FACT_TARGETS),
        init=init,
        dropout=dropout,
        dropout_on="rank",
    )


@register_preset("lotr")
def lotr(
    rank: int = 8,
    targets: tuple[str, ...] = ("q", "v"),
    alpha: float = 1.0,
    reference: bool = False,
) -> TensorAdapterConfig:
    """LoTR (Bershatsky et al., arXiv 2402.01376; daskol/lotr): Tucker-2 over N targets.

    ``ΔW_i = L · M_i · R`` with L (out×r), R (r×in) shared, Normal(0, 1), and M_i (r×r) per
    target, zero: a Tensor-Train ``[in, target, out]``. Scale α/r. Params ``2dr + N·r²``.
    The default is the reference (``reference=True`` changes nothing).
    """
    del reference  # the default follows the official code (docs/methods.md, LoTR)
    return TensorAdapterConfig(
        factorization="tt",
        modes=["in", "depth*qkv", "out"],
        rank=rank,
        alpha=alpha,
        targets=builtins.list(targets),
        init={"zero": "depth*qkv", "method": "normal", "std": 1.0},
    )


#: LoRTA's reference gain for its head, role and layer factors: ``kaiming_uniform_`` with
#: ``a = √5 · init_scale`` and ``init_scale = 0`` draws U(±√(6/r))
LORTA_C_GAIN = math.sqrt(6.0)
#: the reference's default ``lora_alpha``
LORTA_REFERENCE_ALPHA = 8.0


@register_preset("lorta")
def lorta(
    rank: int = 8, alpha: float | None = None, reference: bool = False
) -> TensorAdapterConfig:
    """LoRTA (Hounie et al., arXiv 2410.04060; ihounie/lorta): one 5-way CP tensor.

    Axes (out, head_dim, heads, {q,k,v,o}, layers), rank r, no weights; the head mode splits
    the *input* side of every projection. Init as the reference: A (d×r) U(±1/√r), the
    head/role/layer factors C U(±√(6/r)), B (r×d_h) zero; scale α/r (1 if no α).
    Params ``r·(d + d_h + H + 4 + L)`` = 860·r on ViT-B.

    ``reference=True`` also takes the reference's default α = 8 when ``alpha`` is None.
    """
    if reference and alpha is None:
        alpha = LORTA_REFERENCE_ALPHA
    return TensorAdapterConfig(
        factorization="cp",
        modes=["out", "in", "heads", "qkv", "depth"],
        rank=rank,
        alpha=alpha,
        targets=["q", "k", "v", "o"],
        heads_side="in",
        init={
            "zero": "in",
            "method": "uniform_rank",
            "gains": dict.fromkeys(("heads", "qkv", "depth"), LORTA_C_GAIN),
        },
    )


@register_preset("metatt")
def metatt(
    rank: int = 8,
    targets: tuple[str, ...] = ("q", "k", "v"),
    heads: bool = False,
    scale: float = 1.0,
    reference: bool = False,
) -> TensorAdapterConfig:
    """MetaTT (Lopez-Piqueres et al., arXiv 2506.09105): one shared Tensor-Train.

    Over ``[in, layer, matrix type, (heads), out]``; params grow with the sum of mode sizes:
    ``d·r + L·r² + M·r² + r·d`` without heads. No official code is followed:
    ``reference=True`` changes nothing.
    """
    del reference
    modes = ["in", "depth", "qkv", "heads", "out"] if heads else ["in", "depth", "qkv", "out"]
    return TensorAdapterConfig(
        factorization="tt", modes=modes, rank=rank, scale=scale, targets=builtins.list(targets)
    )


@register_preset("serial_lora")
def serial_lora(
    rank: int = 8,
    targets: tuple[str, ...] = ("q", "k", "v"),
    alpha: float | None = None,
    reference: bool = False,
) -> TensorAdapterConfig:
    """Serial LoRA (Zhong et al., arXiv 2503.17750): one low-rank map per block, shared by the
    projections that read the block's input: ``ΔW_m = W_m · B_s A_s``.

    Not specified by the abstract, chosen here: B_s zero, A_s kaiming-uniform, scale α/r.
    Params ``2·d·r`` per block. There is no official code: ``reference=True`` changes nothing.
    """
    del reference
    return TensorAdapterConfig(
        factorization="lora",
        rank=rank,
        alpha=alpha,
        targets=builtins.list(targets),
        composition="serial",
    )
