"""Planned einsum contractions with a process-wide plan cache.

An expression is planned once per ``(equation, operand shapes, dtype)`` with
``opt_einsum.contract_path`` (optimizer ``"optimal"`` for few operands, ``"auto"``
otherwise), and the plan is replayed as a fixed sequence of pairwise ``torch.einsum``
calls: no re-planning in steady state, nothing ``torch.compile`` cannot trace, and the
planned FLOP count is available to choose between forward strategies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import opt_einsum
import torch

__all__ = [
    "ContractionPlan",
    "PlanCache",
    "PLAN_CACHE",
    "plan_cache_info",
    "clear_plan_cache",
    "plan",
    "einsum_labels",
    "Symbols",
]

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Symbols:
    """Maps arbitrary labels to einsum letters (at most 52 distinct labels)."""

    def __init__(self) -> None:
        self._map: dict[str, str] = {}

    def __call__(self, labels: Sequence[str]) -> str:
        out = []
        for label in labels:
            if label not in self._map:
                if len(self._map) == len(_LETTERS):
                    raise ValueError("an einsum expression may use at most 52 distinct labels")
                self._map[label] = _LETTERS[len(self._map)]
            out.append(self._map[label])
        return "".join(out)


@dataclass(frozen=True)
class ContractionPlan:
    """A planned contraction: pairwise steps ``(operand positions, einsum)``, and its cost."""

    equation: str
    steps: tuple[tuple[tuple[int, ...], str], ...]
    flops: int

    def __call__(self, *operands: torch.Tensor) -> torch.Tensor:
        """Run the plan (operands in the equation's order)."""
        stack = list(operands)
        for positions, step in self.steps:
            args = [stack.pop(p) for p in positions]
            stack.append(torch.einsum(step, *args))
        return stack[0]


class PlanCache:
    """Plans keyed by ``(equation, shapes, dtype)``; counts plans built and cache hits."""

    def __init__(self) -> None:
        self._plans: dict[tuple, ContractionPlan] = {}
        self.built = 0
        self.hits = 0

    def get(
        self,
        equation: str,
        shapes: tuple[tuple[int, ...], ...],
        dtype: torch.dtype,
        *,
        always_plan: bool = False,
    ) -> ContractionPlan:
        """The plan for ``(equation, shapes, dtype)``, built and cached on first use; while a
        graph is compiled an unseen key gets one plain einsum unless ``always_plan`` (a
        caller whose result is a constant to the graph, run eagerly)."""
        key = (equation, shapes, dtype)
        found = self._plans.get(key)
        if found is not None:
            if not torch.compiler.is_compiling():  # a counter read in a graph is a guard
                self.hits += 1
            return found
        if torch.compiler.is_compiling() and not always_plan:
            # planning is Python work torch.compile cannot trace: shapes first seen inside a
            # compiled region run as one einsum (torch plans it); eager calls plan and cache
            return _unplanned(equation, len(shapes))
        # no lock: a race only builds the same plan twice
        found = build_plan(equation, shapes)
        self._plans[key] = found
        self.built += 1
        return found

    def info(self) -> dict[str, int]:
        """``{"built": plans built, "hits": lookups served from the cache, "size": plans held}``."""
        return {"built": self.built, "hits": self.hits, "size": len(self._plans)}

    def clear(self) -> None:
        """Forget every plan and reset the counters."""
        self._plans.clear()
        self.built = self.hits = 0


PLAN_CACHE = PlanCache()


def plan_cache_info() -> dict[str, int]:
    """Statistics of the process-wide plan cache."""
    return PLAN_CACHE.info()


def clear_plan_cache() -> None:
    """Empty the process-wide plan cache."""
    PLAN_CACHE.clear()


def build_plan(equation: str, shapes: tuple[tuple[int, ...], ...]) -> ContractionPlan:
    optimize = "optimal" if len(shapes) <= 5 else "auto"
    _, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=optimize)
    steps = tuple((tuple(c[0]), c[2]) for c in info.contraction_list)
    return ContractionPlan(equation, steps, int(info.opt_cost))


def _unplanned(equation: str, n_operands: int) -> ContractionPlan:
    """One ``torch.einsum`` over every operand (used while tracing a shape never run eagerly)."""
    return ContractionPlan(equation, (((0,) * n_operands, equation),), 0)


def plan(equation: str, *operands: torch.Tensor) -> ContractionPlan:
    """The cached plan of ``equation`` for these operands' shapes and dtype."""
    shapes = tuple(tuple(t.shape) for t in operands)
    return PLAN_CACHE.get(equation, shapes, operands[0].dtype)


def einsum_labels(
    operands: Sequence[tuple[torch.Tensor, Sequence[str]]], output: Sequence[str]
) -> torch.Tensor:
    """Contract labelled tensors into ``output`` labels through a cached plan."""
    sym = Symbols()
    inputs = ",".join(sym(labels) for _, labels in operands)
    equation = f"{inputs}->{sym(output)}"
    tensors = [t for t, _ in operands]
    return plan(equation, *tensors)(*tensors)
