"""Tensor-Train: ``T[i_1..i_N] = G_1[:, i_1, :] ⋯ G_N[:, i_N, :]``.

Cores ``core_<axis>`` of shape ``(r_{n-1}, n_n, r_n)`` with ``r_0 = r_N = 1``. Ranks: one
int for every bond, a list of the ``N-1`` bond ranks, or a mapping ``axis -> rank of the
bond after that axis`` (every axis but the last). By default the core holding ``out``
starts at zero. Parameters: ``Σ_n r_{n-1} n_n r_n``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._ranks import per_axis_ranks
from .base import FactorizedTensor, Term, register_factorization

__all__ = ["TensorTrain"]


@register_factorization("tt")
class TensorTrain(FactorizedTensor):
    """Tensor-Train with per-bond ranks."""

    @classmethod
    def normalize_rank(cls, axes: Sequence[str], rank: object) -> dict[str, int]:
        return per_axis_ranks("tt", list(axes)[:-1], rank)

    @classmethod
    def terms(cls, axes: Sequence[str], rank: Any, options: Mapping[str, Any]) -> list[Term]:
        return [(f"core_{a}", (f"~t{n}", a, f"~t{n + 1}")) for n, a in enumerate(axes)]

    @classmethod
    def label_sizes(cls, axes: Sequence[str], rank: Any) -> dict[str, int]:
        sizes = {"~t0": 1, f"~t{len(axes)}": 1}
        sizes.update({f"~t{n + 1}": rank[a] for n, a in enumerate(list(axes)[:-1])})
        return sizes
