"""The forward computation of one :class:`~tensadapt.layout.Contribution`.

For the pieces of one module that live in one tensor, the factor network is sliced at the
pieces' coordinates (a structural axis becomes a scalar index, or a piece label ``~po`` /
``~pi`` when it varies over output / input chunks) and contracted either

* **contract**: with ``x`` viewed as ``(N, n_in, *in_axes)`` straight to ``(N, P_out,
  *out_axes)`` — ``ΔW`` is never formed; or
* **materialise**: to ``ΔW`` of shape ``(P_out·out_chunk, n_in·in_chunk)``, then one matmul.

Both are cached plans (:mod:`tensadapt.contraction`); ``strategy="auto"`` picks the one with
fewer planned FLOPs for the current token count ``N`` and remembers the choice per ``N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .contraction import PLAN_CACHE, ContractionPlan, Symbols
from .factorizations import FactorizedTensor
from .layout import Contribution

__all__ = ["ContributionProgram"]

PO, PI, TOKENS = "~po", "~pi", "~N"


@dataclass
class _Slice:
    term: str
    axis: str
    index: int | torch.Tensor
    labels: tuple[str, ...]


class ContributionProgram(nn.Module):
    """Computes ``ΔW_c x`` (or ``ΔW_c``) for one contribution, from its tensor's factors."""

    def __init__(
        self,
        contribution: Contribution,
        tensor: FactorizedTensor,
        *,
        scale: float,
        strategy: str = "auto",
        dropout: float = 0.0,
        dropout_on: str = "input",
        serial: bool = False,
    ) -> None:
        super().__init__()
        c = contribution
        self.contribution = c
        self.__dict__["tensor"] = tensor  # shared: owned (and registered) by the adapter model
        self.scale = float(scale)
        self.strategy = strategy
        self.serial = serial
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.dropout_on = dropout_on
        self.n_in = c.n_in_chunks
        # serial: one square map M on the module input, whatever rows it feeds
        self.n_out = 1 if serial else len(c.row_starts)
        self.in_sizes = tuple(c.axis_sizes[a] for a in c.in_axes)
        self.out_sizes = tuple(c.axis_sizes[a] for a in c.out_axes)
        self.in_chunk = math.prod(self.in_sizes)
        self.rows = math.prod(self.out_sizes) if serial else self.n_out * c.row_chunk

        slices: list[_Slice] = []
        for axis, grid in c.index.items():
            term, _ = tensor.axis_term(axis)
            idx = torch.tensor(grid, dtype=torch.long)
            var_po = bool((idx != idx[:1]).any())
            var_pi = bool((idx != idx[:, :1]).any())
            if var_po and var_pi:
                slices.append(_Slice(term, axis, idx, (PO, PI)))
            elif var_po:
                slices.append(_Slice(term, axis, idx[:, 0].clone(), (PO,)))
            elif var_pi:
                slices.append(_Slice(term, axis, idx[0].clone(), (PI,)))
            else:
                slices.append(_Slice(term, axis, int(idx[0, 0]), ()))
        for i, s in enumerate(slices):
            if isinstance(s.index, torch.Tensor):
                self.register_buffer(f"_index{i}", s.index, persistent=False)
        self._slices = slices
        labels_used = {l for s in slices for l in s.labels}
        self.po_used = PO in labels_used and self.n_out > 1
        self.pi_used = PI in labels_used and self.n_in > 1

        term_labels = []
        for name, labels in tensor.term_labels().items():
            labs = list(labels)
            for s in slices:
                if s.term == name:
                    pos = labs.index(s.axis)
                    labs[pos : pos + 1] = list(s.labels)
            term_labels.append(tuple(labs))
        self._term_names = list(tensor.term_labels())
        sym = Symbols()
        factors = ",".join(sym(l) for l in term_labels)
        x_labels = [TOKENS] + ([PI] if self.n_in > 1 else []) + list(c.in_axes)
        y_labels = [TOKENS] + ([PO] if self.po_used else []) + list(c.out_axes)
        w_labels = (
            ([PO] if self.po_used else [])
            + list(c.out_axes)
            + ([PI] if self.pi_used else [])
            + list(c.in_axes)
        )
        self.contract_eq = f"{sym(x_labels)},{factors}->{sym(y_labels)}"
        self.materialise_eq = f"{factors}->{sym(w_labels)}"
        self.x_view = ((self.n_in,) if self.n_in > 1 else ()) + self.in_sizes
        self._choice: dict[tuple[int, torch.dtype], bool] = {}
        self._assembly(c)

    # ----------------------------------------------------------------- assembly of rows
    def _assembly(self, c: Contribution) -> None:
        starts = c.row_starts
        chunk = c.row_chunk
        self.row_start = starts[0]
        self.n_chunks_out = len(starts)
        self.out_rows = len(starts) * chunk
        self.contiguous = all(s == starts[0] + i * chunk for i, s in enumerate(starts))
        self.full = self.contiguous and starts[0] == 0 and self.out_rows == c.module_out
        self.chunk = chunk
        if not self.contiguous:
            if any(s % chunk for s in starts) or c.module_out % chunk:
                raise ValueError(f"rows {starts} of {c.module} are not aligned to {chunk}")
            self.register_buffer(
                "_chunks", torch.tensor([s // chunk for s in starts]), persistent=False
            )
        self.register_buffer(
            "_rows", torch.cat([torch.arange(s, s + chunk) for s in starts]), persistent=False
        )

    def add_rows(self, out2d: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
        """``out2d[:, rows] += alpha * y``; returns the result (in place unless all rows)."""
        y = y.to(out2d.dtype)
        if self.full:
            return torch.add(out2d, y, alpha=alpha)
        if self.contiguous:
            out2d.narrow(1, self.row_start, self.out_rows).add_(y, alpha=alpha)
            return out2d
        n = out2d.shape[0]
        blocks = out2d.view(n, -1, self.chunk)
        blocks.index_add_(1, self._chunks, y.view(n, self.n_chunks_out, self.chunk), alpha=alpha)
        return out2d

    # ---------------------------------------------------------------------- operands
    def operands(self) -> list[torch.Tensor]:
        """The factor network, sliced at this contribution's coordinates."""
        tensor: FactorizedTensor = self.__dict__["tensor"]
        out = []
        for name in self._term_names:
            t = getattr(tensor, name)
            labels = list(tensor.term_labels()[name])
            for i, s in enumerate(self._slices):
                if s.term != name:
                    continue
                dim = labels.index(s.axis)
                if isinstance(s.index, int):
                    t = t.select(dim, s.index)
                else:
                    idx = getattr(self, f"_index{i}")
                    t = t.index_select(dim, idx.reshape(-1)).unflatten(dim, tuple(idx.shape))
                labels[dim : dim + 1] = list(s.labels)
            out.append(t)
        return out

    def _plan(self, equation: str, operands: list[torch.Tensor]) -> ContractionPlan:
        shapes = tuple(tuple(t.shape) for t in operands)
        return PLAN_CACHE.get(equation, shapes, operands[0].dtype)

    def use_contract(self, n_tokens: int, factors: list[torch.Tensor]) -> bool:
        """Whether ``contract`` is cheaper than ``materialise`` for ``n_tokens`` (cached)."""
        if self.strategy != "auto":
            return self.strategy == "contract"
        key = (n_tokens, factors[0].dtype)
        choice = self._choice.get(key)
        if choice is None:
            x_shape = (n_tokens, *self.x_view)
            shapes = (x_shape, *(tuple(f.shape) for f in factors))
            c = PLAN_CACHE.get(self.contract_eq, shapes, factors[0].dtype).flops
            m = self._plan(self.materialise_eq, factors).flops
            m += 2 * n_tokens * self.rows * self.n_in * self.in_chunk
            choice = c <= m
            self._choice[key] = choice
        return choice

    # ------------------------------------------------------------------------ compute
    def delta(self, factors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``ΔW_c`` (unscaled), shape ``(rows, module_in)``; for serial, the square map M."""
        factors = self.operands() if factors is None else factors
        w = self._plan(self.materialise_eq, factors)(*factors)
        w = w.reshape(
            self.n_out if self.po_used else 1, -1, self.n_in if self.pi_used else 1, self.in_chunk
        )
        if not self.po_used and self.n_out > 1:
            w = w.expand(self.n_out, -1, -1, -1)
        if not self.pi_used and self.n_in > 1:
            w = w.expand(-1, -1, self.n_in, -1)
        rows = w.shape[0] * w.shape[1]
        return w.reshape(rows, self.n_in * self.in_chunk)

    def apply_x(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d @ ΔW_cᵀ`` (unscaled) for ``x2d`` of shape ``(N, module_in)``."""
        factors = self.operands()
        n = x2d.shape[0]
        drop_delta = self.dropout is not None and self.dropout_on == "delta" and self.training
        if drop_delta or not self.use_contract(n, factors):
            w = self.delta(factors)
            if drop_delta:
                w = self.dropout(w)
            return x2d @ w.t()
        xv = x2d.reshape(n, *self.x_view)
        operands = [xv, *factors]
        y = self._plan(self.contract_eq, operands)(*operands)
        if not self.po_used and self.n_out > 1:
            y = y.unsqueeze(1).expand(n, self.n_out, *y.shape[1:])
        return y.reshape(n, -1)
