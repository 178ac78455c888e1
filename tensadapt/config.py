"""``TensorAdapterConfig``: what to adapt, how to tensorise it, how to factorise it.

A config describes one adapter tensor group, or several (``groups``: CaRA has a q/k/v
tensor and an o+MLP tensor). A group given as a mapping inherits every field it does not
set from the enclosing config. Everything is validated at construction and round-trips
through JSON (``to_dict`` / ``from_dict``, saved as ``adapter_config.json``).

The update applied to a target is ``y = W x + b + s·ΔW x`` with ``s = alpha / rank`` when
``alpha`` is given (PEFT convention; for per-mode ranks the largest rank), an explicit
``scale``, or 1.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .factorizations import FACTORIZATIONS, FactorizedTensor, InitSpec, get_factorization
from .modes import FEATURE_AXES, StructuralMode, get_mode, mode_parts
from .roles import expand_roles

__all__ = ["GroupConfig", "TensorAdapterConfig", "tensor_axes"]

ORIENTATIONS = ("in_out", "residual")
COMPOSITIONS = ("additive", "serial")
DROPOUT_PLACES = ("input", "delta", "rank")
HEADS_SIDES = ("attention", "in", "out")
HEADS_LAYOUTS = ("semantic", "interleaved")
STRATEGIES = ("auto", "contract", "materialise")


def _choice(value: object, choices: Sequence[str], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{what}={value!r} is invalid; valid values: {', '.join(choices)}")


def tensor_axes(modes: Sequence[str]) -> tuple[str, ...]:
    """The tensor's axes: ``modes`` in order, then ``in`` and ``out`` if no mode holds them."""
    axes = list(modes)
    present = {p for m in modes for p in mode_parts(m)}
    axes += [a for a in ("in", "out") if a not in present]
    return tuple(axes)


@dataclass
class GroupConfig:
    """One adapter tensor (or one tensor per layer/role for modes that leave those free)."""

    targets: list[str] = field(default_factory=lambda: ["q", "v"])
    factorization: str | type[FactorizedTensor] = "lora"
    modes: list[str] = field(default_factory=list)
    rank: int | dict[str, int] | list[int] = 8
    alpha: float | None = None
    scale: float | None = None
    init: str | dict[str, Any] | None = None
    dropout: float = 0.0
    dropout_on: str = "input"
    orientation: str = "in_out"
    composition: str = "additive"
    heads_layout: str = "semantic"
    heads_side: str = "attention"
    bias: bool = False
    factorization_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    @property
    def factorization_cls(self) -> type[FactorizedTensor]:
        return get_factorization(self.factorization)

    @property
    def axes(self) -> tuple[str, ...]:
        return tensor_axes(self.modes)

    @property
    def mode_parts(self) -> set[str]:
        """Every base mode named in ``modes`` (fused ones split)."""
        return {p for m in self.modes for p in mode_parts(m)}

    @property
    def roles(self) -> tuple[str, ...]:
        return expand_roles(self.targets)

    def validate(self) -> None:
        """Raise ConfigError naming the bad value and the valid choices."""
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        self.targets = list(self.targets)
        if not self.targets:
            raise ConfigError("targets is empty; name roles such as ['q', 'v'] or 'attn'")
        self.roles  # noqa: B018 - validates the role names
        cls = self.factorization_cls
        if isinstance(self.modes, str):
            self.modes = [self.modes]
        self.modes = list(self.modes)
        self._validate_modes()
        cls.check_axes(self.axes)
        cls.normalize_rank(self.axes, self.rank)
        self.factorization_options = cls.check_options(self.factorization_options)
        InitSpec.parse(self.init)
        if self.alpha is not None and self.scale is not None:
            raise ConfigError(
                f"give either alpha (scale = alpha / rank) or scale, not both "
                f"(alpha={self.alpha!r}, scale={self.scale!r})"
            )
        for name in ("alpha", "scale"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not (0.0 <= self.dropout < 1.0)
        ):
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        _choice(self.dropout_on, DROPOUT_PLACES, "dropout_on")
        _choice(self.orientation, ORIENTATIONS, "orientation")
        _choice(self.composition, COMPOSITIONS, "composition")
        _choice(self.heads_layout, HEADS_LAYOUTS, "heads_layout")
        _choice(self.heads_side, HEADS_SIDES, "heads_side")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be True or False, got {self.bias!r}")
        if self.composition == "serial":
            if self.bias:
                raise ConfigError(
                    "bias=True adds a shared bias to an additive update; "
                    "it does not combine with composition='serial'"
                )
            bad = [m for m in self.modes if {"heads", "slices"} & set(mode_parts(m))]
            if bad:
                raise ConfigError(
                    f"composition='serial' applies a square map to a block's input; modes {bad} "
                    "do not fit it (valid: depth, qkv and their fusion)"
                )

    def _validate_modes(self) -> None:
        seen: dict[str, str] = {}
        for spec in self.modes:
            if not isinstance(spec, str):
                raise ConfigError(f"modes must be names, got {spec!r}")
            mode = get_mode(spec)
            parts = list(mode_parts(spec)) if "*" in spec else [mode.name]
            for part in parts:
                if part in seen:
                    raise ConfigError(
                        f"mode {part!r} appears twice in modes {self.modes} "
                        f"(in {seen[part]!r} and {spec!r}); each mode may be used once"
                    )
                seen[part] = spec
        for spec in self.modes:
            mode = get_mode(spec)
            if isinstance(mode, StructuralMode):
                covered = [
                    a
                    for other in self.modes
                    if other != spec and other not in FEATURE_AXES
                    for a in get_mode(other).covers
                    if a in mode.covers
                ]
                if covered:
                    raise ConfigError(
                        f"modes {self.modes} index the target attribute(s) {sorted(set(covered))} "
                        "twice; fuse them ('a*b') or drop one"
                    )

    # ------------------------------------------------------------------ derived values
    def effective_scale(self) -> float:
        """``s`` in ``y = W x + s·ΔW x``."""
        if self.scale is not None:
            return float(self.scale)
        if self.alpha is not None:
            rank = self.rank
            r = (
                max(rank.values())
                if isinstance(rank, Mapping)
                else (max(rank) if isinstance(rank, (list, tuple)) else rank)
            )
            return float(self.alpha) / float(r)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (a factorisation class is written by its registered name)."""
        out = {}
        for f in fields(GroupConfig):
            value = getattr(self, f.name)
            if f.name == "factorization" and isinstance(value, type):
                value = FACTORIZATIONS.name_of(value)
            out[f.name] = _jsonable(value)
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


GROUP_FIELDS = tuple(f.name for f in fields(GroupConfig))


@dataclass
class TensorAdapterConfig(GroupConfig):
    """The adapter: one group (the fields inherited from :class:`GroupConfig`) or ``groups``.

    Model-level fields: ``modules_to_save`` (module names kept trainable and saved, ``"auto"``
    finds the classifier head, ``[]`` for none), ``strategy`` (``auto`` picks contract or
    materialise by planned FLOPs), ``target_modules`` / ``layer_pattern`` / ``num_heads``
    for the generic resolver, ``adapter_dtype`` for the adapter parameters.
    """

    groups: list[GroupConfig] | None = None
    modules_to_save: list[str] | str | None = "auto"
    strategy: str = "auto"
    target_modules: dict[str, str] | None = None
    layer_pattern: str | None = None
    num_heads: int | None = None
    adapter_dtype: str = "float32"

    def validate(self) -> None:
        super().validate()
        _choice(self.strategy, STRATEGIES, "strategy")
        if self.adapter_dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ConfigError(
                f"adapter_dtype={self.adapter_dtype!r} is invalid; valid: float32, float64, "
                "bfloat16, float16"
            )
        if self.groups is not None:
            if not isinstance(self.groups, (list, tuple)) or not self.groups:
                raise ConfigError("groups must be a non-empty list of group configs or mappings")
            self.groups = [self._group(i, g) for i, g in enumerate(self.groups)]
        if self.num_heads is not None and (
            isinstance(self.num_heads, bool)
            or not isinstance(self.num_heads, int)
            or self.num_heads <= 0
        ):
            raise ConfigError(f"num_heads must be a positive int, got {self.num_heads!r}")

    def _group(self, index: int, group: GroupConfig | Mapping[str, Any]) -> GroupConfig:
        if isinstance(group, GroupConfig):
            return group
        if not isinstance(group, Mapping):
            raise ConfigError(f"groups[{index}] must be a GroupConfig or a mapping, got {group!r}")
        unknown = set(group) - set(GROUP_FIELDS)
        if unknown:
            raise ConfigError(
                f"groups[{index}] has unknown fields {sorted(unknown)}; "
                f"valid: {', '.join(GROUP_FIELDS)}"
            )
        base = {name: getattr(self, name) for name in GROUP_FIELDS}
        if "factorization" in group and "factorization_options" not in group:
            base["factorization_options"] = {}  # options belong to the parent's factorisation
        base.update(group)
        try:
            return GroupConfig(**copy.deepcopy(base))
        except ConfigError as err:
            raise ConfigError(f"groups[{index}]: {err}") from None

    def resolved_groups(self) -> list[GroupConfig]:
        """The groups to build: ``groups``, or this config's own group fields."""
        if self.groups:
            return list(self.groups)
        return [GroupConfig(**{name: getattr(self, name) for name in GROUP_FIELDS})]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for name in (
            "modules_to_save",
            "strategy",
            "target_modules",
            "layer_pattern",
            "num_heads",
            "adapter_dtype",
        ):
            out[name] = _jsonable(getattr(self, name))
        out["groups"] = None if self.groups is None else [g.to_dict() for g in self.groups]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TensorAdapterConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ConfigError listing the valid ones."""
        valid = {f.name for f in fields(cls)}
        unknown = set(data) - valid
        if unknown:
            raise ConfigError(
                f"unknown config fields {sorted(unknown)}; valid: {', '.join(sorted(valid))}"
            )
        data = dict(data)  # groups stay mappings: validation checks their fields
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TensorAdapterConfig:
        return cls.from_dict(json.loads(text))
