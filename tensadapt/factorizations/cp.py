"""CP (canonical polyadic): ``T[i_1..i_N] = Σ_r λ_r Π_n A_n[i_n, r]``.

One factor ``factor_<axis>`` of shape ``(n, R)`` per axis; the weights ``λ`` are
``"none"`` (absent, default), ``"trainable"`` or ``"fixed"`` (a buffer of ones). By default
the ``out`` factor starts at zero and the others are orthogonal.
Parameters: ``R·Σ_n n_n`` (+ ``R`` for trainable weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ._ranks import positive_int
from .base import FactorizedTensor, Term, register_factorization

__all__ = ["CP"]


@register_factorization("cp")
class CP(FactorizedTensor):
    """Rank-R CP tensor with optional weights."""

    option_choices = {"weights": ("none", "trainable", "fixed")}

    @classmethod
    def normalize_rank(cls, axes: Sequence[str], rank: object) -> int:
        if isinstance(rank, Mapping) or isinstance(rank, (list, tuple)):
            raise ConfigError(
                "cp takes one int rank (its rank is shared by every mode); per-mode ranks "
                "apply to 'tucker' and 'tt'"
            )
        return positive_int(rank, "cp rank")

    @classmethod
    def terms(cls, axes: Sequence[str], rank: Any, options: Mapping[str, Any]) -> list[Term]:
        terms: list[Term] = [(f"factor_{a}", (a, "~r")) for a in axes]
        if options.get("weights", "none") != "none":
            terms.insert(0, ("weights", ("~r",)))
        return terms

    @classmethod
    def label_sizes(cls, axes: Sequence[str], rank: Any) -> dict[str, int]:
        return {"~r": rank}

    @classmethod
    def fixed_terms(cls, options: Mapping[str, Any]) -> set[str]:
        return {"weights"} if options.get("weights") == "fixed" else set()
