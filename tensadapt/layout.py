"""From resolved targets to adapter tensors and each target's coordinates.

For every group of the config, each target is cut into *pieces* (whole, or d×d slices when
a mode covers ``slice``), its two matrix sides are mapped to tensor axes (``in``/``out``,
swapped for fc2/down under ``orientation="residual"``; the attention side split into
``heads`` × head_dim when ``heads`` is a mode), and it is assigned to a tensor *instance*:
target attributes no mode indexes (its layer without ``depth``, its role without ``qkv``)
select the instance, so modes ``[]`` give one small tensor per target (plain LoRA) and
``["depth", "qkv"]`` one tensor for the whole group. Each structural axis has size = number
of distinct keys in the instance, and a piece's coordinate is its key's rank.

The result, a :class:`Layout`, lists the tensors (with shapes), one :class:`Contribution`
per (module, tensor) pair — what the forward pass computes — and one :class:`Placement`
per target for display and checks.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import GroupConfig, TensorAdapterConfig
from .errors import ConfigError, ModeError, TargetResolutionError
from .factorizations import FactorizedTensor
from .modes import FEATURE_AXES, Piece, StructuralMode, get_mode, mode_parts
from .roles import ALIASES, DOWN_ROLES, ROLES
from .targets import Target

__all__ = ["TensorSpec", "Contribution", "Placement", "Layout", "plan_layout"]


@dataclass
class TensorSpec:
    """One adapter tensor: its axes, shape, factorisation and the group it belongs to."""

    key: str
    group: int
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    factorization: type[FactorizedTensor]
    rank: Any
    init: Any
    options: dict[str, Any]

    def count(self) -> int:
        """Trainable parameters of this tensor."""
        return self.factorization.count(self.axes, self.shape, self.rank, self.options)


@dataclass
class Contribution:
    """What one tensor adds to one module's output.

    The module's input is viewed as ``(N, n_in_chunks, *in_axes)``; the output chunks of
    this contribution start at ``row_starts`` (each ``row_chunk`` rows) and are shaped
    ``out_axes``. ``index[axis]`` gives, per (output chunk, input chunk), the coordinate of
    each structural axis of the tensor.
    """

    module: str
    tensor: str
    group: int
    roles: tuple[str, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    axis_sizes: dict[str, int]
    n_in_chunks: int
    row_starts: tuple[int, ...]
    row_chunk: int
    module_out: int
    module_in: int
    index: dict[str, list[list[int]]] = field(default_factory=dict)
    #: key of the group's shared bias (one vector per role), or None
    bias: str | None = None


@dataclass
class Placement:
    """One target's place: which tensor, and its coordinates on each structural axis."""

    target: Target
    group: int
    tensor: str
    coordinates: dict[str, list[int]]


@dataclass
class Layout:
    """Tensors, contributions and placements of a whole config on one model."""

    tensors: dict[str, TensorSpec]
    contributions: list[Contribution]
    placements: list[Placement]
    groups: list[GroupConfig]
    #: shared biases: key -> {role: size}
    biases: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self) -> int:
        """Trainable adapter parameters."""
        tensors = sum(t.count() for t in self.tensors.values())
        return tensors + sum(sum(b.values()) for b in self.biases.values())


@dataclass
class _Geometry:
    target: Target
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    sizes: dict[str, int]
    n_in: int
    n_out: int
    out_chunk: int


def _roles_by_group(
    config: TensorAdapterConfig, targets: Sequence[Target]
) -> list[tuple[str, ...]]:
    present = {t.role for t in targets}
    owner: dict[str, int] = {}
    out = []
    for gi, group in enumerate(config.resolved_groups()):
        named = [r for r in group.targets if r not in ALIASES]
        missing = [r for r in named if r not in present]
        if missing:
            raise TargetResolutionError(
                f"group {gi}: targets {missing} match nothing in this model; roles found: "
                f"{', '.join(r for r in ROLES if r in present) or 'none'}"
                + _mlp_hint(group.targets, missing, present)
            )
        roles = tuple(r for r in group.roles if r in present)
        if not roles:
            raise TargetResolutionError(
                f"group {gi}: targets {group.targets} match nothing in this model; roles found: "
                f"{', '.join(r for r in ROLES if r in present) or 'none'}"
            )
        for r in roles:
            if r in owner:
                raise ConfigError(
                    f"role {r!r} is in groups {owner[r]} and {gi}; give each role one group"
                )
            owner[r] = gi
        out.append(roles)
    return out


def _mlp_hint(targets: Sequence[str], missing: Sequence[str], present: set[str]) -> str:
    """How to name this model's MLP when the config names the other MLP form."""
    plain, gated = ("fc1", "fc2"), ("gate", "up", "down")
    for asked, found in ((plain, gated), (gated, plain)):
        if any(r in asked for r in missing) and any(r in present for r in found):
            have = ", ".join(r for r in found if r in present)
            valid = [r for r in targets if r not in asked] + ["mlp"]
            return (
                f". This model's MLP roles are {have}: name those (or the alias 'mlp') instead "
                f"of {', '.join(r for r in asked if r in missing)}, e.g. targets={valid} "
                "(a preset's targets override reaches each of its groups)"
            )
    return ""


def _split_heads(
    group: GroupConfig, t: Target, side_axes: list[str], side_size: int, gi: int
) -> tuple[list[str], dict[str, int]]:
    if t.heads is None:
        raise ModeError(
            f"group {gi}: mode 'heads' needs the head count of {t.module}, which could not be "
            "found; pass num_heads= in the config"
        )
    if side_size % t.heads:
        valid = [h for h in range(1, side_size + 1) if side_size % h == 0]
        raise ModeError(
            f"group {gi}: heads={t.heads} does not divide the attention width {side_size} of "
            f"{t.module} ({t.role}); valid head counts are {', '.join(map(str, valid))}"
        )
    axis = side_axes[0]
    axes = ["heads", axis] if group.heads_layout == "semantic" else [axis, "heads"]
    return axes, {"heads": t.heads, axis: side_size // t.heads}


def _geometry(group: GroupConfig, gi: int, t: Target, slice_size: int | None) -> _Geometry:
    mode_names = group.mode_parts
    if group.composition == "serial":
        return _Geometry(
            t, ("in",), ("out",), {"in": t.in_features, "out": t.in_features}, 1, 1, t.out_features
        )
    n_in = n_out = 1
    if slice_size is not None:
        for side in (t.in_features, t.out_features):
            if side % slice_size:
                raise ModeError(
                    f"group {gi}: slices of size {slice_size} do not tile {t.module} "
                    f"({t.out_features}×{t.in_features}); every side must be a multiple of it"
                )
        n_in, n_out = t.in_features // slice_size, t.out_features // slice_size
    c_in, c_out = t.in_features // n_in, t.out_features // n_out
    transposed = group.orientation == "residual" and t.role in DOWN_ROLES
    in_axes, out_axes = (["out"], ["in"]) if transposed else (["in"], ["out"])
    sizes = {in_axes[0]: c_in, out_axes[0]: c_out}
    if "heads" in mode_names:
        if t.role not in ("q", "k", "v", "o"):
            raise ModeError(
                f"group {gi}: mode 'heads' applies to attention roles q, k, v, o; "
                f"{t.module} is {t.role!r}. Put MLP roles in a group without 'heads'"
            )
        side = group.heads_side
        if side == "attention":
            side = "in" if t.role == "o" else "out"
        if side == "out":
            out_axes, extra = _split_heads(group, t, out_axes, c_out, gi)
        else:
            in_axes, extra = _split_heads(group, t, in_axes, c_in, gi)
        sizes.update(extra)
    return _Geometry(t, tuple(in_axes), tuple(out_axes), sizes, n_in, n_out, c_out)


def plan_layout(targets: Sequence[Target], config: TensorAdapterConfig) -> Layout:
    """Map resolved targets to tensors and coordinates; raise before anything is built."""
    if not targets:
        raise TargetResolutionError(
            "no adaptable linear layers were found in this model; for an architecture tensadapt "
            "does not know, pass target_modules={role: regex}, layer_pattern and num_heads"
        )
    groups = config.resolved_groups()
    roles_by_group = _roles_by_group(config, targets)
    tensors: dict[str, TensorSpec] = {}
    contributions: list[Contribution] = []
    placements: list[Placement] = []
    biases: dict[str, dict[str, int]] = {}
    for gi, (group, roles) in enumerate(zip(groups, roles_by_group)):
        members = [t for t in targets if t.role in roles]
        t_layout = _plan_group(gi, group, members, config)
        tensors.update(t_layout[0])
        contributions += t_layout[1]
        placements += t_layout[2]
        if group.bias:
            biases[f"g{gi}_bias"] = _bias_sizes(gi, members)
    return Layout(tensors, contributions, placements, groups, biases)


def _bias_sizes(gi: int, members: list[Target]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for t in members:
        if sizes.setdefault(t.role, t.out_features) != t.out_features:
            raise ModeError(
                f"group {gi}: bias=True shares one bias per role across blocks, but {t.role} has "
                f"{t.out_features} outputs in {t.module} and {sizes[t.role]} elsewhere"
            )
    return sizes


def _plan_group(
    gi: int, group: GroupConfig, members: list[Target], config: TensorAdapterConfig
) -> tuple[dict[str, TensorSpec], list[Contribution], list[Placement]]:
    modes = {m: get_mode(m) for m in group.modes if m not in FEATURE_AXES}
    structural = {m: mode for m, mode in modes.items() if isinstance(mode, StructuralMode)}
    covered = set().union(*(m.covers for m in structural.values())) if structural else set()
    slice_size = None
    if "slice" in covered:
        slice_size = min(min(t.in_features, t.out_features) for t in members)
    free = [a for a in ("layer", "role") if a not in covered]
    if group.composition == "serial" and "role" in free:
        free.remove("role")

    geos = [_geometry(group, gi, t, slice_size) for t in members]
    by_instance: dict[str, list[_Geometry]] = defaultdict(list)
    for g in geos:
        key = (
            f"g{gi}"
            + (f"_l{g.target.layer}" if "layer" in free else "")
            + (f"_{g.target.role}" if "role" in free else "")
        )
        by_instance[key].append(g)

    tensors: dict[str, TensorSpec] = {}
    contributions: list[Contribution] = []
    placements: list[Placement] = []
    cls = group.factorization_cls
    for key, inst in by_instance.items():
        sizes = _agree_sizes(gi, key, inst, group)
        pieces = {id(g): _pieces(g) for g in inst}
        coords: dict[str, dict[Any, int]] = {}
        for name, mode in structural.items():
            keys = sorted({mode.key(p) for g in inst for row in pieces[id(g)] for p in row})
            coords[name] = {k: i for i, k in enumerate(keys)}
            sizes[name] = len(keys)
        axes = group.axes
        for a in axes:
            if a not in sizes:  # a fused feature axis such as "in*out"
                sizes[a] = math.prod(sizes[p] for p in mode_parts(a))
        shape = tuple(sizes[a] for a in axes)
        tensors[key] = TensorSpec(
            key,
            gi,
            axes,
            shape,
            cls,
            cls.normalize_rank(axes, group.rank),
            group.init,
            dict(group.factorization_options),
        )

        def index_of(g: _Geometry, name: str, coords=coords, pieces=pieces) -> list[list[int]]:
            mode = structural[name]
            return [[coords[name][mode.key(p)] for p in row] for row in pieces[id(g)]]

        for g in inst:
            placements.append(
                Placement(
                    g.target,
                    gi,
                    key,
                    {n: [i for row in index_of(g, n) for i in row] for n in structural},
                )
            )
        by_module: dict[tuple, list[_Geometry]] = defaultdict(list)
        for g in inst:
            # serial: targets of one module share a contribution only if they share M
            shared = (
                tuple(str(index_of(g, n)) for n in structural)
                if group.composition == "serial"
                else ()
            )
            by_module[(g.target.module, *shared)].append(g)
        for (module, *_), gs in by_module.items():
            gs.sort(key=lambda g: g.target.row_offset)
            first = gs[0]
            contributions.append(
                Contribution(
                    module=module,
                    tensor=key,
                    group=gi,
                    roles=tuple(g.target.role for g in gs),
                    in_axes=first.in_axes,
                    out_axes=first.out_axes,
                    axis_sizes=dict(sizes),
                    n_in_chunks=first.n_in,
                    row_starts=tuple(
                        g.target.row_offset + j * g.out_chunk for g in gs for j in range(g.n_out)
                    ),
                    row_chunk=first.out_chunk,
                    bias=f"g{gi}_bias" if group.bias else None,
                    module_out=first.target.module_out,
                    module_in=first.target.in_features,
                    index={n: [row for g in gs for row in index_of(g, n)] for n in structural},
                )
            )
    return tensors, contributions, placements


def _agree_sizes(gi: int, key: str, inst: list[_Geometry], group: GroupConfig) -> dict[str, int]:
    ref = inst[0]
    for g in inst[1:]:
        if g.sizes != ref.sizes:
            a, b = ref.target, g.target
            stacked = [m for m in group.modes if m not in FEATURE_AXES] or ["(none)"]
            raise ModeError(
                f"group {gi}: modes {stacked} stack {a.module} ({a.role}, "
                f"{a.out_features}×{a.in_features}, heads={a.heads}) with {b.module} "
                f"({b.role}, {b.out_features}×{b.in_features}, heads={b.heads}) into tensor "
                f"{key}, but their shapes differ ({ref.sizes} vs {g.sizes}). Only same-shaped "
                "targets can share a tensor: drop 'qkv' (e.g. for grouped-query k/v), add "
                "'slices' to cut non-square matrices into square ones, or use separate groups"
                + _same_shape_hint(inst)
            )
    return dict(ref.sizes)


def _same_shape_hint(inst: list[_Geometry]) -> str:
    """The role sets of ``inst`` that do share a shape, as targets one could write."""
    by_shape: dict[tuple, list[str]] = {}
    for g in inst:
        roles = by_shape.setdefault(tuple(sorted(g.sizes.items())), [])
        if g.target.role not in roles:
            roles.append(g.target.role)
    if len(by_shape) < 2:
        return ""
    sets = [sorted(rs, key=ROLES.index) for rs in by_shape.values()]
    return (
        ". Roles of the same shape here: "
        + " | ".join(map(str, sets))
        + (f"; e.g. targets={max(sets, key=len)}")
    )


def _pieces(g: _Geometry) -> list[list[Piece]]:
    t = g.target
    return [
        [Piece(t.layer, t.role, po * g.n_in + pi, t.module) for pi in range(g.n_in)]
        for po in range(g.n_out)
    ]
