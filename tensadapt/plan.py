"""The static plan of one contribution: typed data, formed once when the model is built.

For the pieces of one module that live in one tensor, the factor network is sliced at the
pieces' coordinates (:class:`Select`, :class:`Narrow`, :class:`Gather`: a structural axis
becomes a scalar index, or a piece label ``~po`` / ``~pi`` when it varies over output /
input chunks; :class:`Unflatten`: a fused feature axis such as ``in*out`` is split). The
plan then holds the einsum equations over the sliced terms (:class:`Equations`) and, where
one exists, the cut ``ΔW_c = B A`` (:class:`LowRankPlan`). Everything here is plain data
computed from labels and sizes, with no module or tensor: :mod:`tensadapt.program` runs it.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .contraction import PLAN_CACHE, Symbols
from .layout import Contribution
from .modes import mode_parts

__all__ = [
    "PO",
    "PI",
    "TOKENS",
    "Select",
    "Narrow",
    "Gather",
    "Unflatten",
    "SliceOp",
    "TermPlan",
    "Equations",
    "Side",
    "MixPlan",
    "LowRankPlan",
    "plan_terms",
    "plan_equations",
    "plan_low_rank",
    "contract_cheaper",
]

PO, PI, TOKENS = "~po", "~pi", "~N"


@dataclass(frozen=True)
class Select:
    """``t.select(label, index)``: the axis is fixed for the whole contribution."""

    label: str
    index: int


@dataclass(frozen=True)
class Narrow:
    """``t.narrow(label, start, length)``, the window relabelled ``new`` (consecutive
    coordinates: a view)."""

    label: str
    start: int
    length: int
    new: tuple[str, ...]


@dataclass(frozen=True)
class Gather:
    """``t.index_select(label, values)`` unflattened to ``values``' shape, relabelled
    ``new``; ``buffer`` names the index tensor the program registers."""

    label: str
    values: tuple
    new: tuple[str, ...]
    buffer: str

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of :attr:`values` (one or two dimensions)."""
        v = self.values
        return (len(v), len(v[0])) if isinstance(v[0], tuple) else (len(v),)


@dataclass(frozen=True)
class Unflatten:
    """``t.unflatten(label, sizes)``: a fused feature axis split into ``parts``."""

    label: str
    sizes: tuple[int, ...]
    parts: tuple[str, ...]


SliceOp = Select | Narrow | Gather | Unflatten


@dataclass(frozen=True)
class TermPlan:
    """One factor: its name, its labels before slicing, the ops, its labels after."""

    name: str
    full_labels: tuple[str, ...]
    ops: tuple[SliceOp, ...]
    labels: tuple[str, ...]


def _new_labels(op: SliceOp) -> tuple[str, ...]:
    if isinstance(op, Select):
        return ()
    return op.parts if isinstance(op, Unflatten) else op.new


def plan_terms(c: Contribution, term_labels: dict[str, Sequence[str]]) -> tuple[TermPlan, ...]:
    """Per term: the slicing and unflattening ops at ``c``'s coordinates, and the labels that
    result (``~po`` / ``~pi`` where a coordinate varies over output / input chunks)."""
    terms, n_index = [], 0
    for name, labels in term_labels.items():
        labs, ops = list(labels), []
        for label in labels:
            if label in c.index:
                grid = c.index[label]
                var_po = any(row != grid[0] for row in grid)
                var_pi = any(v != row[0] for row in grid for v in row)
                if not (var_po or var_pi):
                    op: SliceOp = Select(label, grid[0][0])
                else:
                    if var_po and var_pi:
                        values = tuple(tuple(row) for row in grid)
                    else:
                        values = tuple(row[0] for row in grid) if var_po else tuple(grid[0])
                    new = tuple(l for l, v in ((PO, var_po), (PI, var_pi)) if v)
                    flat = values if isinstance(values[0], int) else None
                    if flat and flat == tuple(range(flat[0], flat[0] + len(flat))):
                        op = Narrow(label, flat[0], len(flat), new)  # a view: cheap backward
                    else:
                        op = Gather(label, values, new, f"_index{n_index}")
                        n_index += 1
            elif "*" in label and not label.startswith("~"):
                parts = tuple(mode_parts(label))
                op = Unflatten(label, tuple(c.axis_sizes[p] for p in parts), parts)
            else:
                continue
            ops.append(op)
            pos = labs.index(label)
            labs[pos : pos + 1] = _new_labels(op)
        terms.append(TermPlan(name, tuple(labels), tuple(ops), tuple(labs)))
    return tuple(terms)


def sliced_shape(term: TermPlan, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of ``term``'s factor (``shape`` unsliced) once its ops have run."""
    dims, labs = list(shape), list(term.full_labels)
    for op in term.ops:
        d = labs.index(op.label)
        if isinstance(op, Select):
            sizes: list[int] = []
        elif isinstance(op, Narrow):
            sizes = [op.length] if op.new else []
        elif isinstance(op, Gather):
            sizes = list(op.shape)
        else:
            sizes = list(op.sizes)
        dims[d : d + 1] = sizes
        labs[d : d + 1] = _new_labels(op)
    return tuple(dims)


@dataclass(frozen=True)
class Equations:
    """``contract``: ``x`` (viewed ``(N, *x_view)``) with the terms straight to ``y``;
    ``materialise``: the terms to ``ΔW``; ``stage1`` / ``stage2``: ``contract`` in two steps
    around the rank activations (for dropout on them), ``stage1`` over ``x`` and the terms
    ``first`` that hold its feature axes, ``stage2`` over the result and the terms ``rest``."""

    contract: str
    materialise: str
    stage1: str
    stage2: str
    x_view: tuple[int, ...]
    first: tuple[int, ...]
    rest: tuple[int, ...]


def plan_equations(
    c: Contribution, terms: Sequence[TermPlan], n_in: int, po_used: bool, pi_used: bool
) -> Equations:
    """The einsum equations of one contribution over its sliced terms."""
    sym = Symbols()
    labels = [t.labels for t in terms]
    factors = ",".join(sym(l) for l in labels)
    x_labels = [TOKENS] + ([PI] if n_in > 1 else []) + list(c.in_axes)
    y_labels = [TOKENS] + ([PO] if po_used else []) + list(c.out_axes)
    w_labels = (
        ([PO] if po_used else []) + list(c.out_axes) + ([PI] if pi_used else []) + list(c.in_axes)
    )
    in_sizes = tuple(c.axis_sizes[a] for a in c.in_axes)
    # x meets the terms holding its feature axes first; an input cut into chunks keeps its
    # chunk axis, so a mask on the rank activations falls on each chunk's own
    first = tuple(i for i, l in enumerate(labels) if set(c.in_axes) & set(l))
    rest = tuple(i for i in range(len(labels)) if i not in first)
    counts = Counter(l for i in rest for l in labels[i]) + Counter(y_labels)
    if n_in > 1:
        counts[PI] += 1
    stage1 = [x_labels] + [labels[i] for i in first]
    mid = sorted({l for ls in stage1 for l in ls if l in counts}, key=str)
    stage2 = ",".join(sym(l) for l in [mid] + [labels[i] for i in rest])
    return Equations(
        contract=f"{sym(x_labels)},{factors}->{sym(y_labels)}",
        materialise=f"{factors}->{sym(w_labels)}",
        stage1=f"{','.join(sym(l) for l in stage1)}->{sym(mid)}",
        stage2=f"{stage2}->{sym(y_labels)}",
        x_view=((n_in,) if n_in > 1 else ()) + in_sizes,
        first=first,
        rest=rest,
    )


@dataclass(frozen=True)
class Side:
    """One side of the cut: ``equation`` over the terms ``terms`` to the labels ``out``;
    ``view`` = (axes to squeeze, permutation) when the side is one term's view, else None."""

    equation: str
    terms: tuple[int, ...]
    view: tuple[tuple[int, ...], tuple[int, ...]] | None
    out: tuple[str, ...]


@dataclass(frozen=True)
class MixPlan:
    """``B = B' M``: ``B'`` (:attr:`b_out`, rows × ``rank``) from the terms holding output
    labels, the mix ``M`` (``rank`` × chunks·R) from the rest."""

    mix: Side
    b_out: Side
    rank: int
    expand_po: bool


@dataclass(frozen=True)
class LowRankPlan:
    """``ΔW_c = B A``: the labels both sides share (``cut``, of total size ``rank``),
    ``chunks`` input chunks ``A`` is applied to, and how each side is expanded to a matrix."""

    cut: tuple[str, ...]
    rank: int
    chunks: int
    a: Side
    b: Side
    a_expand: bool
    b_expand_pi: bool
    b_expand_po: bool
    mix: MixPlan | None


def plan_low_rank(
    c: Contribution,
    terms: Sequence[TermPlan],
    sizes: dict[str, int],
    *,
    n_in: int,
    n_out: int,
    in_chunk: int,
    rows: int,
    rank_dropout: bool,
) -> LowRankPlan | None:
    """Cut the sliced network into an input side and an output side: ``ΔW_c = B A``.

    Terms holding an ``in`` axis go to ``A``, terms holding an output label to ``B``; the
    others (depth, slice, core, λ) go wherever the two thin products are cheapest:
    ``cost = R·(n_in·in_chunk) + R_B·rows`` (``R`` the size of the labels both sides share).
    With several input chunks (``~pi``, e.g. fc2 cut into slices) ``A`` either spans all
    chunks, or is applied to each chunk (*chunked*) and ``~pi`` joins the rank. Dropout on
    the rank activations fixes the cut right after the terms holding the ``in`` axes, per
    input chunk (as FacT drops ``x U``). None when a term holds both sides (a fused
    ``in*out`` axis)."""
    labels = [t.labels for t in terms]
    in_axes, out_labels = set(c.in_axes), set(c.out_axes) | {PO}
    best = None
    for chunked in (False, True) if n_in > 1 else (False,):
        if rank_dropout and chunked != (n_in > 1):
            continue
        forced_in, forced_out, free = [], [], []
        for i, ls in enumerate(map(set, labels)):
            to_in = bool(in_axes & ls) or (PI in ls and not chunked)
            to_out = bool(out_labels & ls) or (PI in ls and chunked)
            if to_in and to_out:
                break
            (forced_in if to_in else forced_out if to_out else free).append(i)
        else:
            if not forced_in or not forced_out:
                continue
            for mask in range(1 if rank_dropout else 2 ** len(free)):
                a_terms = forced_in + [f for j, f in enumerate(free) if mask >> j & 1]
                b_terms = [i for i in range(len(labels)) if i not in a_terms]
                a_set = {l for i in a_terms for l in labels[i]}
                b_set = {l for i in b_terms for l in labels[i]}
                cut = sorted(a_set & b_set - {PI}, key=str)
                r_a = math.prod(sizes[l] for l in cut)
                r_b = r_a * (n_in if chunked else 1)
                cost = r_a * (n_in * in_chunk) + r_b * rows
                if best is None or cost < best[0]:
                    best = (cost, chunked, a_terms, b_terms, cut, r_a)
    if best is None:
        return None
    _, chunked, a_terms, b_terms, cut, r_a = best
    a_has_pi = any(PI in labels[i] for i in a_terms)
    b_has_pi = any(PI in labels[i] for i in b_terms)
    b_has_po = any(PO in labels[i] for i in b_terms)
    a_out = tuple(cut + ([PI] if a_has_pi else []) + list(c.in_axes))
    b_out = ([PO] if b_has_po else []) + list(c.out_axes) + ([PI] if b_has_pi else []) + cut
    chunks = n_in if chunked else 1
    a, b = _side(labels, a_terms, a_out, sizes), _side(labels, b_terms, tuple(b_out), sizes)
    mix = None
    if chunks > 1 and b.view is None:
        mix = _plan_mix(c, labels, b_terms, cut, sizes, chunks * r_a, rows, n_out)
    return LowRankPlan(
        cut=tuple(cut),
        rank=r_a,
        chunks=chunks,
        a=a,
        b=b,
        a_expand=n_in > 1 and not chunked and not a_has_pi,
        b_expand_pi=chunked and not b_has_pi,
        b_expand_po=n_out > 1 and not b_has_po,
        mix=mix,
    )


def _side(
    labels: Sequence[tuple[str, ...]], terms: Sequence[int], out: tuple[str, ...], sizes: dict
) -> Side:
    sym = Symbols()
    equation = f"{','.join(sym(labels[i]) for i in terms)}->{sym(out)}"
    view = single_term_view(equation, [labels[i] for i in terms], sizes)
    return Side(equation, tuple(terms), view, out)


def _plan_mix(
    c: Contribution,
    labels: Sequence[tuple[str, ...]],
    b_terms: Sequence[int],
    cut: list[str],
    sizes: dict[str, int],
    kr: int,
    rows: int,
    n_out: int,
) -> MixPlan | None:
    """With input chunks (``B`` of rank ``k·R``): ``B = B' M`` when the rank ``R'`` the two
    share makes the passes over ``y`` and ``gy`` cheaper, ``R' (k·R + rows) < k·R · rows``
    per token. For FacT's fc2, ``ΔW_t = V Σ_t Uᵀ`` per slice ``t`` gives ``B' = V`` and
    ``M = [Σ_t]``: rank ``R`` instead of ``4R`` against the outputs."""
    out_labels = set(c.out_axes) | {PO}
    out_terms = [i for i in b_terms if out_labels & set(labels[i])]
    mix_terms = [i for i in b_terms if i not in out_terms]
    out_set = {l for i in out_terms for l in labels[i]}
    mix_set = {l for i in mix_terms for l in labels[i]}
    if not out_terms or not mix_terms or PI in out_set or PI not in mix_set or set(cut) & out_set:
        return None
    cut2 = sorted(mix_set & out_set, key=str)
    r2 = math.prod(sizes[l] for l in cut2)
    if r2 * (kr + rows) >= kr * rows:
        return None
    b_out = tuple(([PO] if PO in out_set else []) + list(c.out_axes) + cut2)
    mix_out = tuple(cut2 + [PI] + cut)
    sym = Symbols()
    mix_eq = f"{','.join(sym(labels[i]) for i in mix_terms)}->{sym(mix_out)}"
    return MixPlan(
        mix=Side(mix_eq, tuple(mix_terms), None, mix_out),
        b_out=_side(labels, out_terms, b_out, sizes),
        rank=r2,
        expand_po=n_out > 1 and PO not in out_set,
    )


def single_term_view(
    equation: str, labels: list[tuple], sizes: dict
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """For a one-term side ``"abc->cb"`` whose summed axes all have size 1: the axes to
    squeeze and the permutation of the rest (the side is then a view); None otherwise."""
    if len(labels) != 1:
        return None
    inputs, output = equation.split("->")
    if len(set(inputs)) != len(inputs):
        return None
    dropped = [i for i, ch in enumerate(inputs) if ch not in output]
    if any(sizes[labels[0][i]] != 1 for i in dropped):
        return None
    kept = [ch for ch in inputs if ch in output]
    return tuple(dropped), tuple(kept.index(ch) for ch in output)


@torch.compiler.assume_constant_result
def contract_cheaper(*key) -> bool:
    """``contract_cheaper(contract_eq, materialise_eq, x_view, shapes, extra, n_tokens, dtype)``:
    whether contracting ``x`` (``(N, *x_view)``) with factors of these ``shapes`` costs no
    more planned FLOPs than forming ``ΔW`` and one ``2·N·extra`` matmul. A constant to a
    compiled graph, planned eagerly and remembered per key."""
    return _contract_cheaper(*key)


@functools.lru_cache(maxsize=4096)
def _contract_cheaper(
    contract_eq: str,
    materialise_eq: str,
    x_view: tuple[int, ...],
    shapes: tuple[tuple[int, ...], ...],
    extra: int,
    n_tokens: int,
    dtype: torch.dtype,
) -> bool:
    c = PLAN_CACHE.get(contract_eq, ((n_tokens, *x_view), *shapes), dtype, always_plan=True)
    m = PLAN_CACHE.get(materialise_eq, shapes, dtype, always_plan=True)
    return c.flops <= m.flops + 2 * n_tokens * extra
