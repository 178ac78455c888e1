"""Tensorisation modes: the named axes of an adapter tensor.

Two kinds of mode exist:

* **feature modes** — ``in``, ``out`` (the sides of a target's matrix) and ``heads``
  (splits the attention side head-major: feature ``h*d_h + e`` is head ``h``);
* **structural modes** — they index *which* target (or slice of one) an entry belongs to:
  ``depth`` (block index), ``qkv`` (role), ``slices`` (d×d slice of a non-square matrix),
  and user-registered ones. A structural mode declares which target attributes it
  ``covers`` (``layer``, ``role``, ``slice``) and maps each piece to a sortable ``key``; its
  size is the number of distinct keys among the tensor's targets.

A fused mode ``"a*b"`` is one axis over the *occurring* combinations of its parts' keys, in
lexicographic order: ``depth*qkv`` over q,k,v of L blocks has size 3L and row ``3l + k``.
Feature modes fuse too: ``"in*out"`` is one axis of size in·out (index ``i·out + o``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from .errors import ConfigError
from .registry import Registry
from .roles import role_index

__all__ = [
    "Mode",
    "FeatureMode",
    "StructuralMode",
    "FusedMode",
    "FusedFeatureMode",
    "mode_parts",
    "Piece",
    "MODES",
    "register_mode",
    "list_modes",
    "get_mode",
    "FEATURE_AXES",
]

FEATURE_AXES = ("in", "out", "heads")
ATTRIBUTES = frozenset({"layer", "role", "slice"})


@dataclass(frozen=True)
class Piece:
    """One d×d (or whole) block of one target, as structural modes see it."""

    layer: int
    role: str
    slice: int = 0
    module: str = ""


class Mode:
    """Base class of every mode. ``name`` is set by :func:`register_mode`."""

    name: str = ""
    covers: frozenset[str] = frozenset()


class FeatureMode(Mode):
    """A mode made of matrix features (``in``, ``out``, ``heads``)."""


class StructuralMode(Mode):
    """A mode that indexes targets. Subclasses set ``covers`` and implement :meth:`key`."""

    def key(self, piece: Piece) -> Hashable:
        """A sortable key; pieces with equal keys share coordinates on this axis."""
        raise NotImplementedError


MODES: Registry[Mode] = Registry("mode")
register_mode = MODES.register


def list_modes(pattern: str = "*") -> list[str]:
    """Registered mode names (fused modes are written ``"a*b"`` from these)."""
    return MODES.list(pattern)


@register_mode("in")
class InMode(FeatureMode):
    """The input side of a target's matrix (the residual side under ``orientation='residual'``)."""


@register_mode("out")
class OutMode(FeatureMode):
    """The output side of a target's matrix."""


@register_mode("heads")
class HeadsMode(FeatureMode):
    """Attention heads: splits the attention side (out of q/k/v, in of o) into heads × head_dim."""


@register_mode("depth")
class DepthMode(StructuralMode):
    """Which transformer block."""

    covers = frozenset({"layer"})

    def key(self, piece: Piece) -> Hashable:
        return piece.layer


@register_mode("qkv")
class QKVMode(StructuralMode):
    """Which projection of a block (any roles, in canonical order q,k,v,o,fc1,fc2,...)."""

    covers = frozenset({"role"})

    def key(self, piece: Piece) -> Hashable:
        return role_index(piece.role)


@register_mode("slices")
class SlicesMode(StructuralMode):
    """Which d×d slice of a non-square matrix (fc1 4d×d: 4 slices along out)."""

    covers = frozenset({"slice"})

    def key(self, piece: Piece) -> Hashable:
        return piece.slice


class FusedMode(StructuralMode):
    """One axis over the occurring combinations of several structural modes."""

    def __init__(self, parts: Sequence[StructuralMode]) -> None:
        self.parts = tuple(parts)
        self.name = "*".join(p.name for p in self.parts)
        self.covers = frozenset().union(*(p.covers for p in self.parts))

    def key(self, piece: Piece) -> Hashable:
        return tuple(p.key(piece) for p in self.parts)


class FusedFeatureMode(FeatureMode):
    """One axis over several feature modes, row-major: ``"in*out"`` has index ``i·out + o``."""

    def __init__(self, parts: Sequence[FeatureMode]) -> None:
        self.parts = tuple(parts)
        self.name = "*".join(p.name for p in self.parts)


def mode_parts(spec: str) -> tuple[str, ...]:
    """The base modes of ``spec`` (``"depth*qkv"`` -> ``("depth", "qkv")``)."""
    return tuple(spec.split("*"))


def get_mode(spec: str | type[Mode]) -> Mode:
    """An instance of the mode named ``spec``; ``"a*b"`` fuses structural modes (one axis over
    the occurring combinations) or feature modes (one axis over their product)."""
    if isinstance(spec, str) and "*" in spec:
        parts = [get_mode(part) for part in mode_parts(spec)]
        if len(parts) < 2 or any(not p.name for p in parts):
            raise ConfigError(f"fused mode {spec!r} needs at least two parts, like 'depth*qkv'")
        if all(isinstance(p, StructuralMode) for p in parts):
            return FusedMode(parts)
        if all(isinstance(p, FeatureMode) for p in parts):
            return FusedFeatureMode(parts)
        raise ConfigError(
            f"fused mode {spec!r} mixes feature modes ({', '.join(FEATURE_AXES)}) with structural "
            "ones; fuse structural modes together ('depth*qkv') or feature modes together "
            "('in*out')"
        )
    cls = MODES.get(spec)
    mode = cls()
    if isinstance(mode, StructuralMode) and not mode.covers <= ATTRIBUTES:
        raise ConfigError(
            f"mode {mode.name!r} covers {sorted(mode.covers)}; a structural mode may cover "
            f"only {sorted(ATTRIBUTES)}"
        )
    return mode
