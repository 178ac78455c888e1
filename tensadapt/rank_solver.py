"""Ranks for a parameter budget (isoparameter) or a common rank (isorank).

:func:`solve_ranks` picks the free ranks of a config so that the adapter's exact parameter
count (:func:`~tensadapt.count_parameters`) lands as close to a budget as the structure
allows; :func:`apply_rank` gives every free rank one value (TensLoRA's two conditions).

How the ranks move. Every group's rank is a *profile*: one int (LoRA, CP), or one rank per
key (Tucker: per axis; TT: per bond) whose ratios are taken from the config's own ranks
(an int rank means a flat profile). A scalar level ``t = 1, 2, …`` sets each free rank to
``clamp(round(t · r_k / max r), 1, cap_k)`` where ``cap_k`` is the largest *useful* rank
(a Tucker rank up to its axis size, a TT bond up to the smaller unfolding, LoRA up to
``min(in, out)``, CP unbounded). The count is non-decreasing in ``t``, so a bisection finds
the two levels that bracket the budget; a greedy pass then raises single ranks (one Tucker
mode, one TT bond, one group) from the lower level toward the upper one while that brings
the count closer. The result is therefore per-mode ranks that differ from the profile by at
most one, and its count is the closest found among those candidates.

Counting uses the resolved layout once (``resolve_targets(model, cfg).layout``) and the
factorisation's ``count`` for each candidate: nothing is allocated and nothing is re-resolved
per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import nn

from .config import TensorAdapterConfig
from .errors import ConfigError
from .factorizations import LoRA, TensorTrain, Tucker
from .layout import Layout, TensorSpec
from .resolve import Resolution, as_config, resolve_targets

__all__ = ["RankSolution", "solve_ranks", "apply_rank", "free_ranks"]

_MAX_LEVEL = 1 << 24


class RankSolution(NamedTuple):
    """``(config, params)``: the config with its new ranks and its exact parameter count."""

    config: TensorAdapterConfig
    params: int
    #: the budget asked for (``None`` for :func:`apply_rank`)
    budget: int | None = None

    @property
    def rel_error(self) -> float:
        """``(params - budget) / budget`` (0 when no budget was given)."""
        if not self.budget:
            return 0.0
        return (self.params - self.budget) / self.budget

    @property
    def ranks(self) -> list[Any]:
        """The rank of every group (an int, or a per-mode mapping)."""
        return [g.rank for g in self.config.resolved_groups()]


@dataclass
class _Group:
    """The free rank variables of one config group."""

    index: int
    tensors: list[TensorSpec]
    #: None for a single int rank; else the keys of the per-mode mapping
    keys: tuple[str, ...] | None
    #: profile weight of every free key (max 1); {"": 1.0} for an int rank
    weights: dict[str, float]
    #: largest useful rank of every key (None = unbounded)
    caps: dict[str, int | None]
    #: keys kept at their given rank
    fixed: dict[str, int]

    def at_level(self, t: int) -> dict[str, int]:
        out = dict(self.fixed)
        for k, w in self.weights.items():
            r = max(1, round(t * w))
            cap = self.caps.get(k)
            out[k] = min(r, cap) if cap is not None else r
        return out

    def rank_value(self, ranks: Mapping[str, int]) -> int | dict[str, int]:
        if self.keys is None:
            return ranks[""]
        values = [ranks[k] for k in self.keys]
        return values[0] if len(set(values)) == 1 else {k: ranks[k] for k in self.keys}

    def count(self, ranks: Mapping[str, int]) -> int:
        value = self.rank_value(ranks)
        total = 0
        for spec in self.tensors:
            cls = spec.factorization
            rank = cls.normalize_rank(spec.axes, value)
            total += cls.count(spec.axes, spec.shape, rank, spec.options)
        return total

    def saturation_level(self) -> int | None:
        """The smallest level at which every free rank has reached its cap (None: no cap)."""
        levels = []
        for k, w in self.weights.items():
            cap = self.caps.get(k)
            if cap is None:
                return None
            levels.append(math.ceil((cap + 0.5) / w))
        return max(levels, default=1)


def _caps(spec: TensorSpec, keys: tuple[str, ...] | None) -> dict[str, int | None]:
    cls = spec.factorization
    sizes = dict(zip(spec.axes, spec.shape))
    if keys is None:
        if issubclass(cls, LoRA):
            return {"": min(spec.shape)}
        return {"": None}
    if issubclass(cls, TensorTrain):
        caps: dict[str, int | None] = {}
        for n, a in enumerate(spec.axes[:-1]):
            left = math.prod(spec.shape[: n + 1])
            right = math.prod(spec.shape[n + 1 :])
            caps[a] = min(left, right)
        return caps
    if issubclass(cls, Tucker):
        return {k: sizes[k] for k in keys}
    return {k: sizes.get(k) for k in keys}


def _merge_caps(a: dict[str, int | None], b: dict[str, int | None]) -> dict[str, int | None]:
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
        elif out[k] is None or v is None:
            out[k] = None
        else:
            out[k] = max(out[k], v)  # useful as long as one tensor still benefits
    return out


def _groups(
    layout: Layout,
    free_groups: Collection[int] | None,
    fixed_modes: Collection[str],
) -> tuple[list[_Group], int]:
    """The free groups and the parameter count that does not depend on them."""
    groups = layout.groups
    if free_groups is not None:
        bad = [g for g in free_groups if not 0 <= g < len(groups)]
        if bad:
            raise ConfigError(f"groups {bad} do not exist; this config has {len(groups)} group(s)")
    constant = sum(sum(b.values()) for b in layout.biases.values())
    out: list[_Group] = []
    for gi, group in enumerate(groups):
        tensors = [t for t in layout.tensors.values() if t.group == gi]
        if (free_groups is not None and gi not in free_groups) or not tensors:
            constant += sum(t.count() for t in tensors)
            continue
        cls = group.factorization_cls
        canonical = cls.normalize_rank(group.axes, group.rank)
        if isinstance(canonical, Mapping):
            keys = tuple(canonical)
            fixed = {k: int(canonical[k]) for k in keys if k in fixed_modes}
            free = {k: int(canonical[k]) for k in keys if k not in fixed}
            top = max(free.values(), default=1)
            weights = {k: r / top for k, r in free.items()}
        elif isinstance(canonical, int):
            keys, fixed, weights = None, {}, {"": 1.0}
        else:
            raise ConfigError(
                f"group {gi}: cannot solve the rank of factorization {cls.name!r}: its rank "
                f"normalises to {canonical!r}, neither an int nor a per-mode mapping"
            )
        if not weights:
            constant += sum(t.count() for t in tensors)
            continue
        caps: dict[str, int | None] = {}
        for spec in tensors:
            caps = _merge_caps(caps, _caps(spec, keys))
        out.append(_Group(gi, tensors, keys, weights, caps, fixed))
    return out, constant


class _Search:
    def __init__(self, groups: list[_Group], constant: int) -> None:
        self.groups = groups
        self.constant = constant
        self.cache: dict[tuple, int] = {}

    def count(self, state: list[dict[str, int]]) -> int:
        key = tuple(tuple(sorted(s.items())) for s in state)
        if key not in self.cache:
            self.cache[key] = self.constant + sum(g.count(s) for g, s in zip(self.groups, state))
        return self.cache[key]

    def level(self, t: int) -> list[dict[str, int]]:
        return [g.at_level(t) for g in self.groups]

    def max_level(self) -> int | None:
        levels = [g.saturation_level() for g in self.groups]
        return None if any(lv is None for lv in levels) else max(levels)

    def solve(self, budget: int) -> list[dict[str, int]]:
        t_max = self.max_level()
        if self.count(self.level(1)) >= budget:
            return self.level(1)
        lo, hi = 1, 2  # invariant: count(level(lo)) < budget
        while self.count(self.level(hi)) < budget:
            if (t_max is not None and hi >= t_max) or hi >= _MAX_LEVEL:
                return self.level(hi)  # every free rank is at its cap
            lo, hi = hi, hi * 2 if t_max is None else min(hi * 2, t_max)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.count(self.level(mid)) < budget:
                lo = mid
            else:
                hi = mid
        return self.refine(self.level(lo), self.level(hi), budget)

    def refine(
        self, lower: list[dict[str, int]], upper: list[dict[str, int]], budget: int
    ) -> list[dict[str, int]]:
        """Raise single ranks from ``lower`` toward ``upper`` while the count gets closer."""
        best = min((lower, upper), key=lambda s: (abs(self.count(s) - budget), self.count(s)))
        state = [dict(s) for s in lower]
        while True:
            moves = []
            for gi, (cur, top) in enumerate(zip(state, upper)):
                for k in cur:
                    if cur[k] < top[k]:
                        cand = [dict(s) for s in state]
                        cand[gi][k] += 1
                        moves.append(cand)
            if not moves:
                break
            for cand in moves:
                if abs(self.count(cand) - budget) < abs(self.count(best) - budget):
                    best = cand
            below = [c for c in moves if self.count(c) <= budget]
            if not below:
                break
            state = max(below, key=self.count)
        return best


def _with_ranks(
    config: TensorAdapterConfig, groups: list[_Group], state: list[dict[str, int]]
) -> TensorAdapterConfig:
    data = config.to_dict()
    for g, ranks in zip(groups, state):
        value = g.rank_value(ranks)
        if config.groups:
            data["groups"][g.index]["rank"] = value
        else:
            data["rank"] = value
    return TensorAdapterConfig.from_dict(data)


def _prepare(
    model: nn.Module,
    config: TensorAdapterConfig | Mapping[str, Any],
    groups: Collection[int] | None,
    fixed_modes: Collection[str],
    resolution: Resolution | None,
) -> tuple[TensorAdapterConfig, _Search]:
    config = as_config(config)
    if resolution is None:
        resolution = resolve_targets(model, config)
    free, constant = _groups(resolution.layout, groups, fixed_modes)
    if not free:
        raise ConfigError(
            "this config has no free rank to solve (every group or mode is fixed); "
            f"groups={list(groups) if groups is not None else 'all'}, "
            f"fixed_modes={sorted(fixed_modes)}"
        )
    return config, _Search(free, constant)


def free_ranks(
    model: nn.Module,
    config: TensorAdapterConfig | Mapping[str, Any],
    *,
    groups: Collection[int] | None = None,
    fixed_modes: Collection[str] = (),
) -> dict[int, dict[str, int | None]]:
    """The free rank keys of every group and their caps (``""`` is a group's single rank)."""
    _, search = _prepare(model, config, groups, fixed_modes, None)
    return {g.index: {k: g.caps.get(k) for k in g.weights} for g in search.groups}


def solve_ranks(
    model: nn.Module,
    config: TensorAdapterConfig | Mapping[str, Any],
    budget: int,
    *,
    groups: Collection[int] | None = None,
    fixed_modes: Collection[str] = (),
    resolution: Resolution | None = None,
) -> RankSolution:
    """Pick the free ranks of ``config`` so that its parameter count is closest to ``budget``.

    Args:
        model: The base model (a ``torch.device("meta")`` model is fine: only shapes are read).
        config: A config or its dict form; its ranks give the per-mode profile.
        budget: Target number of trainable adapter parameters (heads not included).
        groups: Indices of the groups whose ranks may change (default: all).
        fixed_modes: Per-mode rank keys (Tucker axes, TT bonds) kept at their given rank.
        resolution: ``resolve_targets(model, config)`` if already computed.

    Returns:
        ``RankSolution(config, params, budget)``; ``params`` is exact. When the budget is
        below the smallest count (all free ranks 1) or above the largest useful one, that
        extreme is returned: check :attr:`RankSolution.rel_error`.
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ConfigError(f"budget must be a positive int, got {budget!r}")
    config, search = _prepare(model, config, groups, fixed_modes, resolution)
    state = search.solve(budget)
    return RankSolution(_with_ranks(config, search.groups, state), search.count(state), budget)


def apply_rank(
    model: nn.Module,
    config: TensorAdapterConfig | Mapping[str, Any],
    rank: int,
    *,
    groups: Collection[int] | None = None,
    fixed_modes: Collection[str] = (),
    cap: bool = True,
    resolution: Resolution | None = None,
) -> RankSolution:
    """Set every free rank to ``rank`` (isorank), per-mode ranks capped at their useful size.

    With ``cap=True`` a Tucker rank never exceeds its axis size (a qkv mode of 3 gets rank
    3), a TT bond its smaller unfolding and a LoRA rank ``min(in, out)``.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ConfigError(f"rank must be a positive int, got {rank!r}")
    config, search = _prepare(model, config, groups, fixed_modes, resolution)
    state = []
    for g in search.groups:
        ranks = dict(g.fixed)
        for k in g.weights:
            c = g.caps.get(k)
            ranks[k] = min(rank, c) if (cap and c is not None) else rank
        state.append(ranks)
    return RankSolution(_with_ranks(config, search.groups, state), search.count(state), None)
