"""Published methods as :class:`~tensadapt.config.TensorAdapterConfig` presets.

``get(name, **kw)`` returns the config; ``list()`` the names. Keyword arguments override any
config field (``targets``, ``dropout``, ``scale``, ...). Parameter counts below are for
ViT-B/16 (d = 768, L = 12, H = 12, d_h = 64) and are checked exactly by the test suite.
"""

from __future__ import annotations

import builtins
import inspect
from collections.abc import Callable
from typing import Any

from .config import GROUP_FIELDS, TensorAdapterConfig
from .errors import ConfigError, UnknownNameError
from .roles import MLP_ROLES, ROLES, expand_roles

__all__ = ["get", "list", "register_preset", "PRESETS", "TENSLORA_VARIANTS", "CARA_MODES"]

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


def get(name: str, **kwargs: Any) -> TensorAdapterConfig:
    """The config of preset ``name``; ``kwargs`` are the preset's arguments or config fields."""
    if name not in PRESETS:
        raise UnknownNameError(f"unknown preset {name!r}; valid presets are: {', '.join(list())}")
    fn = PRESETS[name]
    params = inspect.signature(fn).parameters
    own = {k: v for k, v in kwargs.items() if k in params}
    fields = {k: v for k, v in kwargs.items() if k not in params}
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
) -> TensorAdapterConfig:
    """LoRA (Hu et al. 2021; PEFT): ``ΔW = B A`` per target, B zero, A kaiming-uniform(√5).

    Params ``r·(in + out)`` per target; on q, v of ViT-B: ``r·1536·24``. Scale α/r (1 if no α).
    """
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
    lambda_std: float = 1.0,
) -> TensorAdapterConfig:
    """CaRA — Canonical Rank Adaptation (Veeramacheneni et al., ICML 2025; BonnBytes/CaRA).

    Two CP tensors with trainable weights λ, shared by all blocks:
    (1) q/k/v ``(L·3, d_in, H, d_h)`` (``modes`` 4; 5: ``(L, 3, d, H, d_h)``, 3:
    ``(L·3, d, d)``, 2: ``(L·3, d·d)``); (2) o + MLP slices ``(L·9, d, d)`` with the
    residual side last (fc2 read transposed) and three trainable biases (o, fc1, fc2) shared
    across blocks. The second factor of each tensor starts at zero, layer/slice factors
    xavier-normal, the others orthogonal; λ ones, or Normal(lambda_mean, lambda_std).
    DropConnect on ΔW; a per-task scale s. Params (default): ``2526·R + 4608``.
    """
    if modes not in CARA_MODES:
        raise ConfigError(f"cara modes={modes!r} is invalid; valid: {sorted(CARA_MODES)}")
    weights = (
        {"weights": "ones"}
        if lambda_mean is None
        else {"weights": "normal", "weights_mean": lambda_mean, "weights_std": lambda_std}
    )
    first = CARA_MODES[modes]
    structural = [m for m in first if m not in ("in", "heads", "out", "in*out")]
    qkv_init = {
        "zero": "in",
        "method": "orthogonal",
        "methods": dict.fromkeys(structural, "xavier_normal"),
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
    interleaved_heads: bool = False,
) -> TensorAdapterConfig:
    """TensLoRA (Marmoret et al., arXiv 2509.19391; ax-le/TensLoRA) on q, k, v.

    ``variant`` picks the tensorisation (att = heads on the output side); Tucker (default:
    core zero, factors orthogonal, per-mode ranks allowed) or CP (first, d_in, factor zero;
    weights fixed at ones). E.g. qkv_depth: one ``(d, d, 3, L)`` tensor,
    ``2rd + 3r + rL + r⁴`` params. ``interleaved_heads=True`` reproduces the reference
    code's C-order head unfold (output column ``j·H + h``) bit-exactly.
    """
    if variant not in TENSLORA_VARIANTS:
        raise ConfigError(
            f"tenslora variant={variant!r} is invalid; valid: {', '.join(TENSLORA_VARIANTS)}"
        )
    if factorization not in ("tucker", "cp"):
        raise ConfigError(f"tenslora factorization={factorization!r}; valid: tucker, cp")
    extra: dict[str, Any] = (
        {"init": {"zero": "core"}}
        if factorization == "tucker"
        else {"init": {"zero": "in"}, "factorization_options": {"weights": "fixed"}}
    )
    return TensorAdapterConfig(
        factorization=factorization,
        modes=TENSLORA_VARIANTS[variant],
        rank=rank,
        scale=scale,
        targets=["q", "k", "v"],
        heads_layout="interleaved" if interleaved_heads else "semantic",
        **extra,
    )


@register_preset("fact_tt")
def fact_tt(rank: int = 8, scale: float = 1.0, dropout: float = 0.1) -> TensorAdapterConfig:
    """FacT-TT (Jie & Deng, AAAI 2023; JieShibo/PETL-ViT).

    One tensor ``(L·12, d, d)`` over q, k, v, o, fc1 (4 slices), fc2 (4 slices) of every
    block: ``ΔW_s = V Σ_s U`` with U (d×r) and V (r×d, zero) shared and a free r×r core per
    slice — a Tensor-Train over ``[in, slice, out]``. Dropout on the rank-r activations.
    Params ``1536r + 144r²``.
    """
    return TensorAdapterConfig(
        factorization="tt",
        modes=["in", "depth*qkv*slices", "out"],
        rank=rank,
        scale=scale,
        targets=["q", "k", "v", "o", "fc1", "fc2"],
        init={"zero": "out"},
        dropout=dropout,
        dropout_on="rank",
    )


@register_preset("fact_tk")
def fact_tk(
    rank: int = 32,
    scale: float = 1.0,
    dropout: float = 0.1,
    reference_mlp_reshape: bool = False,
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
    """
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
        targets=["q", "k", "v", "o", "fc1", "fc2"],
        init={"zero": "out"},
        dropout=dropout,
        dropout_on="rank",
    )


@register_preset("lotr")
def lotr(
    rank: int = 8, targets: tuple[str, ...] = ("q", "v"), alpha: float = 1.0
) -> TensorAdapterConfig:
    """LoTR (Bershatsky et al., arXiv 2402.01376; daskol/lotr): Tucker-2 over N targets.

    ``ΔW_i = L · M_i · R`` with L (out×r), R (r×in) shared, Normal(0, 1), and M_i (r×r) per
    target, zero: a Tensor-Train ``[in, target, out]``. Scale α/r. Params ``2dr + N·r²``.
    """
    return TensorAdapterConfig(
        factorization="tt",
        modes=["in", "depth*qkv", "out"],
        rank=rank,
        alpha=alpha,
        targets=builtins.list(targets),
        init={"zero": "depth*qkv", "method": "normal", "std": 1.0},
    )


@register_preset("lorta")
def lorta(rank: int = 8, alpha: float | None = None) -> TensorAdapterConfig:
    """LoRTA (Hounie et al., arXiv 2410.04060; ihounie/lorta): one 5-way CP tensor.

    Axes (out, head_dim, heads, {q,k,v,o}, layers), rank r, no weights; the head mode splits
    the *input* side of every projection. A (d×r) kaiming, B (r×d_h) zero; scale α/r.
    Params ``r·(d + d_h + H + 4 + L)`` = 860·r on ViT-B.
    """
    return TensorAdapterConfig(
        factorization="cp",
        modes=["out", "in", "heads", "qkv", "depth"],
        rank=rank,
        alpha=alpha,
        targets=["q", "k", "v", "o"],
        heads_side="in",
        init={"zero": "in", "methods": {"out": "kaiming_uniform"}, "method": "kaiming_uniform"},
    )


@register_preset("metatt")
def metatt(
    rank: int = 8,
    targets: tuple[str, ...] = ("q", "k", "v"),
    heads: bool = False,
    scale: float = 1.0,
) -> TensorAdapterConfig:
    """MetaTT (Lopez-Piqueres et al., arXiv 2506.09105): one shared Tensor-Train.

    Over ``[in, layer, matrix type, (heads), out]``; params grow with the sum of mode sizes:
    ``d·r + L·r² + M·r² + r·d`` without heads.
    """
    modes = ["in", "depth", "qkv", "heads", "out"] if heads else ["in", "depth", "qkv", "out"]
    return TensorAdapterConfig(
        factorization="tt", modes=modes, rank=rank, scale=scale, targets=builtins.list(targets)
    )


@register_preset("serial_lora")
def serial_lora(
    rank: int = 8, targets: tuple[str, ...] = ("q", "k", "v"), alpha: float | None = None
) -> TensorAdapterConfig:
    """Serial LoRA (Zhong et al., arXiv 2503.17750): one low-rank map per block, shared by the
    projections that read the block's input: ``ΔW_m = W_m · B_s A_s``.

    Not specified by the abstract, chosen here: B_s zero, A_s kaiming-uniform, scale α/r.
    Params ``2·d·r`` per block.
    """
    return TensorAdapterConfig(
        factorization="lora",
        rank=rank,
        alpha=alpha,
        targets=builtins.list(targets),
        composition="serial",
    )
