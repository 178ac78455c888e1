"""One side of a low-rank cut (``A``, ``B`` or a mix), formed for every coordinate at once.

A side ``S = einsum(T_1[c], …, T_m[c])`` whose terms are sliced at a structural coordinate
``c`` (``select`` of an index, ``narrow`` to a block of a fused axis) is the block ``c`` of
``S_all = einsum(T_1, …, T_m)`` over the unsliced factors. :class:`BatchedSide` plans
``S_all`` with the sliced labels kept in front, split into blocks ``(Π_L |L| / n_L, n_L…)``
(``n_L`` the narrow length, 1 for a select), and the permutation that returns a block to the
side's own label order. :class:`~tensadapt.step_cache.StepCache` forms it once per forward:
the blocks are put in the side's order (and, given ``final_shape``, the caller's matrix
shape) once for all of them, so a module's block is one ``unbind`` output with no view op of
its own (each would be one more autograd node per module and step).

:class:`SharedSide` covers two sides that do not split into blocks: one with no sliced term
(the same matrix for every module, e.g. CaRA's fc2 ``B = λ ⊙ F_in``), formed once per forward
pass; and one narrowed to a window of a fused axis that does not tile it (CaRA's fc1 reads
slices ``9l+1 … 9l+4`` of the ``L·9`` axis), formed once over the whole axis, each module then
taking its window (a narrow and a reshape instead of a contraction of its own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .contraction import PLAN_CACHE, Symbols
from .plan import Narrow, Select, SliceOp
from .step_cache import StepCache

__all__ = ["BatchedSide", "SharedSide", "plan_side"]


class BatchedSide:
    """The plan of one side over unsliced factors, and this side's block coordinates."""

    def __init__(
        self,
        term_names: Sequence[str],
        full_labels: Sequence[tuple[str, ...]],
        ops: Sequence[Sequence[SliceOp]],
        sizes: dict[str, int],
        out_labels: Sequence[str],
        final_shape: tuple[int, ...] | None = None,
    ) -> None:
        batch: dict[str, tuple[str, int, int, tuple[str, ...]]] = {}
        for term_ops in ops:
            for op in term_ops:
                if isinstance(op, Select):
                    spec = ("select", op.index, 1, ())
                elif isinstance(op, Narrow) and len(op.new) == 1:
                    spec = ("narrow", op.start, op.length, op.new)
                else:
                    raise ValueError(f"op {op!r} does not batch")
                if batch.setdefault(op.label, spec) != spec:
                    raise ValueError(f"label {op.label!r} sliced two ways")
        if not batch:
            raise ValueError("no sliced term")
        new_labels = [l for spec in batch.values() for l in spec[3]]
        rest = [l for l in out_labels if l not in new_labels]
        self.blocks_shape: list[int] = []
        coords: list[int] = []
        for label, (_, start, n, _new) in batch.items():
            size = sizes[label]
            if size % n or start % n:
                raise ValueError(f"{label!r}: block {start}+{n} does not tile {size}")
            self.blocks_shape.append(size // n)
            coords.append(start // n)
        self.block_lengths = [spec[2] for spec in batch.values()]
        self.index = int(
            sum(c * math.prod(self.blocks_shape[i + 1 :]) for i, c in enumerate(coords))
        )
        sym = Symbols()
        self.equation = f"{','.join(sym(l) for l in full_labels)}->{sym(list(batch) + rest)}"
        self.term_names = tuple(term_names)
        # a block holds (n_L for each narrowed label…, rest…); selects are squeezed away
        kept = [l for spec in batch.values() for l in spec[3]] + rest
        self.squeeze = tuple(i for i, spec in enumerate(batch.values()) if spec[0] == "select")
        self.perm = tuple(kept.index(l) for l in out_labels)
        self.n_batch = len(batch)
        self.final_shape = final_shape
        self.key = (self.equation, self.term_names, tuple(self.blocks_shape))
        self.key += (tuple(self.block_lengths), self.squeeze, self.perm, final_shape)

    def _build(self, terms: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        shapes = tuple(tuple(t.shape) for t in terms)
        full = PLAN_CACHE.get(self.equation, shapes, terms[0].dtype)(*terms)
        rest = full.shape[self.n_batch :]
        split = [d for nb, n in zip(self.blocks_shape, self.block_lengths) for d in (nb, n)]
        k = self.n_batch
        order = [2 * i for i in range(k)] + [2 * i + 1 for i in range(k)]
        order += list(range(2 * k, 2 * k + len(rest)))
        blocks = full.reshape(*split, *rest).permute(order)
        blocks = blocks.reshape(-1, *blocks.shape[k:])
        # every block in the side's label order at once: drop the selects' axes, permute
        if self.squeeze:
            blocks = blocks.squeeze(tuple(d + 1 for d in self.squeeze))
        blocks = blocks.permute(0, *(d + 1 for d in self.perm))
        if self.final_shape is not None:
            blocks = blocks.reshape(blocks.shape[0], *self.final_shape)
        return full, blocks.unbind(0)

    def side(self, tensor: torch.nn.Module, cache: StepCache) -> torch.Tensor | None:
        """This coordinate's block in the side's label order (of ``final_shape`` if given);
        None inside a backward."""
        terms = [getattr(tensor, name) for name in self.term_names]
        blocks = cache.get((id(tensor), *self.key), terms, lambda: self._build(terms))
        return None if blocks is None else blocks[self.index]


class SharedSide:
    """A side formed once per forward pass for every module: whole (no sliced term) or over
    the whole of one narrowed label (``window``: ``(start, length)`` of that label)."""

    def __init__(
        self,
        term_names: Sequence[str],
        full_labels: Sequence[tuple[str, ...]],
        out_labels: Sequence[str],
        final_shape: tuple[int, ...] | None,
        window: tuple[str, str, int, int] | None = None,
    ) -> None:
        # window: (sliced label, the label it becomes, start, length)
        labels = list(out_labels)
        self.axis = None
        if window is not None:
            sliced, new, self.start, self.length = window
            self.axis = labels.index(new)
            labels[self.axis] = sliced
        sym = Symbols()
        self.equation = f"{','.join(sym(l) for l in full_labels)}->{sym(labels)}"
        self.term_names = tuple(term_names)
        self.final_shape = final_shape
        mode = "whole" if window is None else ("window", self.axis)
        self.key = (mode, self.equation, self.term_names, final_shape if window is None else None)

    def _build(self, terms: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
        shapes = tuple(tuple(t.shape) for t in terms)
        full = PLAN_CACHE.get(self.equation, shapes, terms[0].dtype)(*terms)
        if self.axis is None and self.final_shape is not None:
            full = full.reshape(self.final_shape)
        return full, (full,)

    def side(self, tensor: torch.nn.Module, cache: StepCache) -> torch.Tensor | None:
        """This module's matrix (of ``final_shape`` if given); None inside a backward."""
        terms = [getattr(tensor, name) for name in self.term_names]
        blocks = cache.get((id(tensor), *self.key), terms, lambda: self._build(terms))
        if blocks is None:
            return None
        if self.axis is None:
            return blocks[0]
        window = blocks[0].narrow(self.axis, self.start, self.length)
        return window if self.final_shape is None else window.reshape(self.final_shape)


def plan_side(
    term_names: Sequence[str],
    full_labels: Sequence[tuple[str, ...]],
    ops: Sequence[Sequence[SliceOp]],
    sizes: dict[str, int],
    out_labels: Sequence[str],
    final_shape: tuple[int, ...] | None = None,
) -> BatchedSide | SharedSide:
    """The plan that forms this side once per forward pass for every module: blocks of one
    product (:class:`BatchedSide`), else a :class:`SharedSide`; ValueError when neither fits
    (an index gather, a label sliced two ways, several windows)."""
    try:
        return BatchedSide(term_names, full_labels, ops, sizes, out_labels, final_shape)
    except ValueError:
        pass
    flat = [op for term_ops in ops for op in term_ops]
    if not flat:
        return SharedSide(term_names, full_labels, out_labels, final_shape)
    op = flat[0]
    if all(o == op for o in flat) and isinstance(op, Narrow) and len(op.new) == 1:
        window = (op.label, op.new[0], op.start, op.length)
        return SharedSide(term_names, full_labels, out_labels, final_shape, window)
    raise ValueError("side neither splits into blocks nor is shared whole or by windows")
