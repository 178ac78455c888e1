"""Tucker: ``T = G ×_1 U_1 ×_2 … ×_N U_N``.

Core ``G`` of shape ``(r_1, …, r_N)`` (zero at init by default) and one factor
``factor_<axis>`` of shape ``(n, r_n)`` per axis (orthogonal). Ranks are one int or one per
mode; a rank may exceed its mode's size. Parameters: ``Π r_n + Σ n_n r_n``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._ranks import per_axis_ranks
from .base import FactorizedTensor, Term, register_factorization

__all__ = ["Tucker"]


@register_factorization("tucker")
class Tucker(FactorizedTensor):
    """Tucker tensor with per-mode ranks."""

    default_zero = "core"

    @classmethod
    def normalize_rank(cls, axes: Sequence[str], rank: object) -> dict[str, int]:
        return per_axis_ranks("tucker", list(axes), rank)

    @classmethod
    def terms(cls, axes: Sequence[str], rank: Any, options: Mapping[str, Any]) -> list[Term]:
        core: Term = ("core", tuple(f"~r:{a}" for a in axes))
        return [core] + [(f"factor_{a}", (a, f"~r:{a}")) for a in axes]

    @classmethod
    def label_sizes(cls, axes: Sequence[str], rank: Any) -> dict[str, int]:
        return {f"~r:{a}": rank[a] for a in axes}
