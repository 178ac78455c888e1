"""The forward computation of one :class:`~tensadapt.layout.Contribution`, run from its
:mod:`~tensadapt.plan` (typed data fixed at build time).

The sliced factor network is contracted either

* **contract**: with ``x`` viewed as ``(N, n_in, *in_axes)`` straight to ``(N, P_out,
  *out_axes)`` — ``ΔW`` is never formed; or
* **materialise**: to ``ΔW`` of shape ``(P_out·out_chunk, n_in·in_chunk)``, then one matmul.

Both are cached plans (:mod:`tensadapt.contraction`); ``strategy="auto"`` picks the one with
fewer planned FLOPs for the current token count ``N`` (:func:`~tensadapt.plan.contract_cheaper`).
Dropout goes on the input (``input``), on ``ΔW`` itself (``delta``, DropConnect) or on the
rank activations after ``x`` meets the input-side factors (``rank``, as in FacT).

When ``contract`` is chosen, the layer runs it in LoRA form: :meth:`low_rank` forms the cut
``ΔW_c = B A`` of the plan (``A`` from the terms on the input side, ``B`` from the rest, both
small and independent of ``x``). :meth:`apply_x` is the general path (materialise,
DropConnect, mixed dtypes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .batched_side import BatchedSide, SharedSide, plan_side
from .contraction import PLAN_CACHE, ContractionPlan
from .drop_connect import draw_key, hashed_keep_mask
from .factorizations import FactorizedTensor
from .layout import Contribution
from .low_rank import keep_mask, keep_scale
from .plan import (
    PI,
    PO,
    Gather,
    LowRankPlan,
    Narrow,
    Select,
    Side,
    contract_cheaper,
    plan_equations,
    plan_low_rank,
    plan_terms,
    sliced_shape,
)
from .step_cache import StepCache

__all__ = ["ContributionProgram", "RoleBias"]


class RoleBias(nn.Module):
    """Trainable bias vectors ``bias_<role>``, one per role, shared by every block (zero init)."""

    def __init__(self, sizes: dict[str, int], *, dtype=None, device=None) -> None:
        super().__init__()
        for role, size in sizes.items():
            self.register_parameter(
                f"bias_{role}", nn.Parameter(torch.zeros(size, dtype=dtype, device=device))
            )


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
        bias: RoleBias | None = None,
    ) -> None:
        super().__init__()
        c = contribution
        self.contribution = c
        # the factors and role biases are shared: owned (and registered) by the adapter
        # model, so they are held in a one-element tuple nn.Module does not register
        self._shared = (tensor, bias)
        self.scale = float(scale)
        self.strategy = strategy
        self.serial = serial
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.dropout_on = dropout_on
        self.n_in = c.n_in_chunks
        # serial: one square map M on the module input, whatever rows it feeds
        self.n_out = 1 if serial else len(c.row_starts)
        self.in_chunk = math.prod(c.axis_sizes[a] for a in c.in_axes)
        self.rows = (
            math.prod(c.axis_sizes[a] for a in c.out_axes) if serial else self.n_out * c.row_chunk
        )
        full_labels = tensor.term_labels()
        self.terms = plan_terms(c, full_labels)
        for term in self.terms:
            for op in term.ops:
                if isinstance(op, Gather):
                    idx = torch.tensor(op.values, dtype=torch.long, device="cpu")
                    self.register_buffer(op.buffer, idx, persistent=False)
        self._shapes = tuple(sliced_shape(t, getattr(tensor, t.name).shape) for t in self.terms)
        used = {l for t in self.terms for l in t.labels}
        self.po_used = PO in used and self.n_out > 1
        self.pi_used = PI in used and self.n_in > 1
        self.equations = plan_equations(c, self.terms, self.n_in, self.po_used, self.pi_used)
        self.contract_eq = self.equations.contract
        self.materialise_eq = self.equations.materialise
        self.x_view = self.equations.x_view
        self._assembly(c)
        sizes: dict[str, int] = {}
        for t, shape in zip(self.terms, self._shapes):
            sizes.update(zip(t.labels, shape))
        rank_drop = self.dropout is not None and self.dropout_on == "rank"
        self.cut: LowRankPlan | None = plan_low_rank(
            c,
            self.terms,
            sizes,
            n_in=self.n_in,
            n_out=self.n_out,
            in_chunk=self.in_chunk,
            rows=self.rows,
            rank_dropout=rank_drop,
        )
        self._sides: dict[str, Side] = {}
        if self.cut is not None:
            self._sides = {"a": self.cut.a, "b": self.cut.b}
            if self.cut.mix is not None:
                self._sides.update(mix=self.cut.mix.mix, b_out=self.cut.mix.b_out)
        self._plan_batches()

    # ------------------------------------------------------------ plan facts
    @property
    def tensor(self) -> FactorizedTensor:
        """The factorised tensor this contribution reads (shared with other modules)."""
        return self._shared[0]

    @property
    def low_rank_ok(self) -> bool:
        """Whether the network cuts into ``ΔW_c = B A`` (the low-rank path)."""
        return self.cut is not None

    @property
    def chunks(self) -> int:
        """How many input chunks ``A`` is applied to (1 without a cut)."""
        return 1 if self.cut is None else self.cut.chunks

    @property
    def cut_size(self) -> int:
        """The rank ``R`` of the cut."""
        return self.cut.rank

    @property
    def mix_eq(self) -> str | None:
        """The mix ``M``'s equation when ``B = B' M`` is planned, else None."""
        return None if self.cut is None or self.cut.mix is None else self.cut.mix.mix.equation

    @property
    def mix_rank(self) -> int:
        """``R'``, the rank between ``B'`` and the mix."""
        return self.cut.mix.rank

    def _plan_batches(self) -> None:
        """Each einsum side whose terms are sliced only by ``select`` / ``narrow`` (or not at
        all) is formed once per forward pass for all coordinates (:func:`plan_side`)."""
        self._batched: dict[str, BatchedSide | SharedSide] = {}
        cut = self.cut
        if cut is None:
            return
        tensor = self.tensor
        sizes: dict[str, int] = {}
        for t in self.terms:
            sizes.update(zip(t.full_labels, getattr(tensor, t.name).shape))
        r, kr = cut.rank, cut.chunks * cut.rank
        # the matrix each side becomes in low_rank / low_rank_mix, formed for every block at
        # once (None: the side is expanded first)
        final = {
            "a": None if cut.a_expand else (r, -1),
            "b": None if cut.b_expand_pi or cut.b_expand_po else (-1, kr),
            "mix": (cut.mix.rank, -1) if cut.mix is not None else None,
            "b_out": None if cut.mix is None or cut.mix.expand_po else (-1, cut.mix.rank),
        }
        for name, side in self._sides.items():
            if side.view is not None or len(side.terms) < 2:
                continue
            terms = [self.terms[i] for i in side.terms]
            try:
                self._batched[name] = plan_side(
                    [t.name for t in terms],
                    [t.full_labels for t in terms],
                    [t.ops for t in terms],
                    sizes,
                    side.out,
                    final[name],
                )
            except ValueError:
                continue

    def _side(
        self, side: str, factors: list[torch.Tensor], cache: StepCache | None
    ) -> torch.Tensor:
        """One side of the cut (``a``, ``b``, ``mix``, ``b_out``) in its output label order:
        this coordinate's block of the all-coordinates product when ``cache`` holds it."""
        batched = self._batched.get(side) if cache is not None else None
        if batched is not None:
            block = batched.side(self.tensor, cache)
            if block is not None:
                return block
        plan = self._sides[side]
        equation, terms, view = plan.equation, plan.terms, plan.view
        if view is not None:  # one term: a view (squeeze size-1 axes, permute), no einsum
            term = self.terms[terms[0]]
            moves = bool(view[0]) or view[1] != tuple(range(len(view[1])))
            if cache is not None and moves and not term.ops:
                # an unsliced term (CaRA's A): the same matrix for every module, laid out
                # row-major once per forward pass instead of once per module
                t = getattr(self.tensor, term.name)
                key = (id(self.tensor), "view", term.name, view)
                blocks = cache.get(key, [t], lambda: _laid_out(t, view))
                if blocks is not None:
                    return blocks[0]
            squeeze, perm = view
            t = factors[terms[0]]
            return (t.squeeze(squeeze) if squeeze else t).permute(perm)
        operands = [factors[i] for i in terms]
        if len(operands) == 1:
            return torch.einsum(equation, operands[0])
        return self._plan(equation, operands)(*operands)

    def low_rank(
        self, factors: list[torch.Tensor], cache: StepCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` with ``ΔW_c x = B (A x)`` (unscaled). ``A`` is ``(R, module_in)`` in the
        layout of ``x``, or ``(R, in_chunk)`` applied to each of :attr:`chunks` input chunks;
        ``B`` is ``(rows, chunks·R)`` in the order of :attr:`_rows` (serial: ``(in, ·)``).
        With ``cache``, sides shared across coordinates are formed once per forward pass."""
        a = self._side("a", factors, cache)
        b = self._side("b", factors, cache)
        cut = self.cut
        r, k = cut.rank, cut.chunks
        if cut.a_expand:
            a = a.reshape(r, 1, self.in_chunk).expand(r, self.n_in, self.in_chunk)
        if cut.b_expand_pi:
            b = b.reshape(-1, 1, r).expand(-1, k, r)
        if cut.b_expand_po:
            b = b.reshape(1, -1, k * r).expand(self.n_out, -1, k * r)
        return _matrix(a, r, -1), _matrix(b, -1, k * r)

    def low_rank_mix(
        self, factors: list[torch.Tensor], cache: StepCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(A, B', M)`` with ``ΔW_c = B' M Ā`` (unscaled) when a mix is planned (``B'`` is
        ``(rows, R')``, ``M`` is ``(R', chunks·R)``), else ``(A, B, None)`` as :meth:`low_rank`."""
        if self.mix_eq is None:
            a, b = self.low_rank(factors, cache)
            return a, b, None
        a = _matrix(self._side("a", factors, cache), self.cut_size, -1)
        mix = self._side("mix", factors, cache)
        b = self._side("b_out", factors, cache)
        r2 = self.mix_rank
        if self.cut.mix.expand_po:
            b = b.reshape(1, -1, r2).expand(self.n_out, -1, r2)
        return a, _matrix(b, -1, r2), _matrix(mix, r2, -1)

    def fast_path(self, n_tokens: int, factors: list[torch.Tensor]) -> bool:
        """Whether this call may run as ``x Aᵀ Bᵀ`` (contract strategy, no DropConnect)."""
        if not self.low_rank_ok:
            return False
        if self.drops_delta():
            return False
        return self.use_contract(n_tokens, factors)

    def drops_delta(self) -> bool:
        """Whether this call applies DropConnect to ``ΔW`` (``dropout_on="delta"``, training)."""
        return self.dropout is not None and self.training and self.dropout_on == "delta"

    def drop_connect(self, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(ΔW ⊙ m, 1 / (1 − p′))`` with ``m_ij ~ Bernoulli(1 − p′)``: dropout on the update
        itself (the hashed mask of :mod:`~tensadapt.drop_connect`, ``p′`` within 2⁻¹⁷ of
        ``p``). The caller folds the factor into its scale, so the dense update is passed over
        once."""
        p = self.dropout.p
        keep = hashed_keep_mask(tuple(delta.shape), p, draw_key(), delta.device)
        return torch.where(keep, delta, 0.0), keep_scale(p)

    def materialises(self, n_tokens: int, factors: list[torch.Tensor]) -> bool:
        """Whether this call forms ``ΔW`` (DropConnect in training, or the cheaper strategy)."""
        return self.drops_delta() or not self.use_contract(n_tokens, factors)

    def add_weight_rows(self, weight: torch.Tensor, d: torch.Tensor, alpha: float) -> torch.Tensor:
        """``weight`` with ``alpha · d`` added on this contribution's rows (out of place)."""
        if self.full:
            return torch.add(weight, d.to(weight.dtype), alpha=alpha)
        return weight.index_add(0, self._rows, d.to(weight.dtype), alpha=alpha)

    def rank_dropout(self) -> float:
        """The dropout probability on the rank activations in this call (0 if none)."""
        d = self.dropout
        if d is None or not d.training or self.dropout_on != "rank":
            return 0.0
        return float(d.p)

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
                "_chunks",
                torch.tensor([s // chunk for s in starts], device="cpu"),
                persistent=False,
            )
        self.register_buffer(
            "_rows",
            torch.tensor([r for s in starts for r in range(s, s + chunk)], device="cpu"),
            persistent=False,
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
        tensor = self.tensor
        out = []
        for term in self.terms:
            t = getattr(tensor, term.name)
            labs = list(term.full_labels)
            for op in term.ops:
                dim = labs.index(op.label)
                if isinstance(op, Select):
                    t = t.select(dim, op.index)
                    new: tuple[str, ...] = ()
                elif isinstance(op, Gather):
                    idx = getattr(self, op.buffer)
                    t = t.index_select(dim, idx.reshape(-1)).unflatten(dim, tuple(idx.shape))
                    new = op.new
                elif isinstance(op, Narrow):
                    t = t.narrow(dim, op.start, op.length)
                    new = op.new
                else:
                    t = t.unflatten(dim, op.sizes)
                    new = op.parts
                labs[dim : dim + 1] = new
            out.append(t)
        return out

    def lazy_operands(self) -> LazyOperands:
        """:meth:`operands`, sliced only when a term is read: the paths that form their
        sides for every module at once never read them (a slice per term per module and
        step, each an autograd node)."""
        return LazyOperands(self)

    @property
    def has_bias(self) -> bool:
        """Whether this contribution adds shared role biases."""
        return self._shared[1] is not None

    def bias_vector(self) -> torch.Tensor | None:
        """The shared role biases laid out on this contribution's rows (None without bias)."""
        bias = self._shared[1]
        if bias is None:
            return None
        roles = self.contribution.roles
        if len(roles) == 1:  # the parameter itself, not a one-piece concatenation (a copy)
            return getattr(bias, f"bias_{roles[0]}")
        return torch.cat([getattr(bias, f"bias_{r}") for r in roles])

    def _plan(self, equation: str, operands: list[torch.Tensor]) -> ContractionPlan:
        shapes = tuple(tuple(t.shape) for t in operands)
        return PLAN_CACHE.get(equation, shapes, operands[0].dtype)

    def use_contract(self, n_tokens: int, factors: list[torch.Tensor]) -> bool:
        """Whether ``contract`` is cheaper than ``materialise`` for ``n_tokens`` (cached per
        token count; a constant while a graph is compiled)."""
        if self.strategy != "auto":
            return self.strategy == "contract"
        extra = self.rows * self.n_in * self.in_chunk
        return contract_cheaper(
            self.contract_eq,
            self.materialise_eq,
            self.x_view,
            self._shapes,
            extra,
            n_tokens,
            factors.dtype if isinstance(factors, LazyOperands) else factors[0].dtype,
        )

    # ------------------------------------------------------------------------ compute
    def delta(self, factors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``ΔW_c`` (unscaled), shape ``(rows, module_in)``; for serial, the square map M."""
        factors = self.operands() if factors is None else factors
        w = self._plan(self.materialise_eq, factors)(*factors)
        w = w.reshape(
            self.n_out if self.po_used else 1,
            -1,
            self.n_in if self.pi_used else 1,
            self.in_chunk,
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
        dropping = self.dropout is not None and self.training
        if dropping and self.dropout_on == "delta":
            masked, factor = self.drop_connect(self.delta(factors))
            return x2d @ masked.mul_(factor).t()
        xv = x2d.reshape(n, *self.x_view)
        if dropping and self.dropout_on == "rank":
            eq = self.equations
            first, rest = eq.first, eq.rest
            ops1 = [xv] + [factors[i] for i in first]
            mid = self._plan(eq.stage1, ops1)(*ops1)
            q = self.dropout.p  # the low-rank path's mask law, so both paths agree
            mid = mid * keep_mask(tuple(mid.shape), q, mid.device) * keep_scale(q)
            ops2 = [mid] + [factors[i] for i in rest]
            y = self._plan(eq.stage2, ops2)(*ops2)
        elif self.use_contract(n, factors):
            operands = [xv, *factors]
            y = self._plan(self.contract_eq, operands)(*operands)
        else:
            return x2d @ self.delta(factors).t()
        if not self.po_used and self.n_out > 1:
            y = y.unsqueeze(1).expand(n, self.n_out, *y.shape[1:])
        return y.reshape(n, -1)


class LazyOperands(Sequence):
    """A program's sliced factor network (:meth:`ContributionProgram.operands`), formed on
    the first read of a term; ``dtype`` without forming it."""

    __slots__ = ("_program", "_terms", "dtype")

    def __init__(self, program: ContributionProgram) -> None:
        self._program = program
        self._terms: list[torch.Tensor] | None = None
        self.dtype = getattr(program.tensor, program.terms[0].name).dtype

    def _formed(self) -> list[torch.Tensor]:
        if self._terms is None:
            self._terms = self._program.operands()
        return self._terms

    def __getitem__(self, i):  # type: ignore[override]
        return self._formed()[i]

    def __len__(self) -> int:
        return len(self._program.terms)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self._formed())


def _laid_out(
    t: torch.Tensor, view: tuple[tuple[int, ...], tuple[int, ...]]
) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """``(v, (v,))``: the one-term side ``view`` of ``t`` made contiguous, for the step cache."""
    squeeze, perm = view
    v = (t.squeeze(squeeze) if squeeze else t).permute(perm).contiguous()
    return v, (v,)


def _matrix(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``t.reshape(rows, cols)`` (one of them -1), or ``t`` itself when it has that shape
    already: a reshape to the same shape is still an autograd node."""
    if t.dim() == 2 and (rows == -1 or t.shape[0] == rows) and (cols == -1 or t.shape[1] == cols):
        return t
    return t.reshape(rows, cols)
