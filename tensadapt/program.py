"""The forward computation of one :class:`~tensadapt.layout.Contribution`.

For the pieces of one module that live in one tensor, the factor network is sliced at the
pieces' coordinates (a structural axis becomes a scalar index, or a piece label ``~po`` /
``~pi`` when it varies over output / input chunks; a fused feature axis such as ``in*out``
is unflattened) and contracted either

* **contract**: with ``x`` viewed as ``(N, n_in, *in_axes)`` straight to ``(N, P_out,
  *out_axes)`` — ``ΔW`` is never formed; or
* **materialise**: to ``ΔW`` of shape ``(P_out·out_chunk, n_in·in_chunk)``, then one matmul.

Both are cached plans (:mod:`tensadapt.contraction`); ``strategy="auto"`` picks the one with
fewer planned FLOPs for the current token count ``N`` and remembers the choice per ``N``.
Dropout goes on the input (``input``), on ``ΔW`` itself (``delta``, DropConnect) or on the
rank activations after ``x`` meets the input-side factors (``rank``, as in FacT).

When ``contract`` is chosen, the layer runs it in LoRA form: :meth:`low_rank` cuts the sliced
network into ``ΔW_c = B A`` (``A`` from the terms on the input side, ``B`` from the rest,
both small and independent of ``x``), and every contribution of a module goes through one
:class:`~tensadapt.layers.LowRankLinear` call. :meth:`apply_x` is the general path
(materialise, DropConnect, mixed dtypes).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from .batched_side import BatchedSide, SharedSide, plan_side
from .contraction import PLAN_CACHE, ContractionPlan, Symbols
from .drop_connect import draw_key, hashed_keep_mask
from .factorizations import FactorizedTensor
from .layout import Contribution
from .low_rank import keep_mask, keep_scale
from .modes import mode_parts
from .step_cache import StepCache

__all__ = ["ContributionProgram", "RoleBias"]

PO, PI, TOKENS = "~po", "~pi", "~N"


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
        self.__dict__["tensor"] = tensor  # shared: owned (and registered) by the adapter model
        self.__dict__["bias_module"] = bias
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
        self._plan_terms(c, tensor)
        self._plan_equations(c)
        self._choice: dict[tuple[int, torch.dtype], bool] = {}
        self._assembly(c)
        self._plan_low_rank(c)

    # ------------------------------------------------------------ static structure
    def _plan_terms(self, c: Contribution, tensor: FactorizedTensor) -> None:
        """Per term: the slicing/unflattening steps and the labels that result."""
        self._term_names = list(tensor.term_labels())
        self._ops: list[list[tuple]] = []
        self._labels: list[tuple[str, ...]] = []
        n_index = 0
        used: set[str] = set()
        for labels in tensor.term_labels().values():
            labs, ops = list(labels), []
            for label in labels:
                if label in c.index:
                    grid = c.index[label]
                    var_po = any(row != grid[0] for row in grid)
                    var_pi = any(v != row[0] for row in grid for v in row)
                    if not (var_po or var_pi):
                        ops.append(("select", label, grid[0][0]))
                        new = []
                    else:
                        values = (
                            grid
                            if var_po and var_pi
                            else ([row[0] for row in grid] if var_po else grid[0])
                        )
                        new = [l for l, v in ((PO, var_po), (PI, var_pi)) if v]
                        used.update(new)
                        flat = values if isinstance(values[0], int) else None
                        if flat and flat == list(range(flat[0], flat[0] + len(flat))):
                            # consecutive coordinates: a view (cheap backward, no scatter)
                            ops.append(("narrow", label, flat[0], len(flat), tuple(new)))
                        else:
                            buffer = f"_index{n_index}"
                            n_index += 1
                            idx = torch.tensor(values, dtype=torch.long, device="cpu")
                            self.register_buffer(buffer, idx, persistent=False)
                            ops.append(("index", label, buffer, tuple(new)))
                elif "*" in label and not label.startswith("~"):
                    parts = mode_parts(label)
                    ops.append(("unflatten", label, tuple(c.axis_sizes[p] for p in parts), parts))
                    new = list(parts)
                else:
                    continue
                pos = labs.index(label)
                labs[pos : pos + 1] = new
            self._ops.append(ops)
            self._labels.append(tuple(labs))
        self.po_used = PO in used and self.n_out > 1
        self.pi_used = PI in used and self.n_in > 1

    def _plan_equations(self, c: Contribution) -> None:
        sym = Symbols()
        factors = ",".join(sym(l) for l in self._labels)
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
        # two stages for dropout on the rank activations: x meets the terms holding its
        # feature axes first; an input cut into chunks keeps its chunk axis, so the mask
        # falls on each chunk's own rank activations (as the low-rank path does)
        first = [i for i, l in enumerate(self._labels) if set(c.in_axes) & set(l)]
        rest = [i for i in range(len(self._labels)) if i not in first]
        counts = Counter(l for i in rest for l in self._labels[i]) + Counter(y_labels)
        if self.n_in > 1:
            counts[PI] += 1
        stage1 = [x_labels] + [self._labels[i] for i in first]
        mid = sorted({l for ls in stage1 for l in ls if l in counts}, key=str)
        self._stage_terms = (first, rest)
        self.stage1_eq = f"{','.join(sym(l) for l in stage1)}->{sym(mid)}"
        self.stage2_eq = f"{','.join(sym(l) for l in [mid] + [self._labels[i] for i in rest])}->"
        self.stage2_eq += sym(y_labels)

    def _plan_low_rank(self, c: Contribution) -> None:
        """Cut the sliced network into an input side and an output side: ``ΔW_c = B A``.

        Terms holding an ``in`` axis go to ``A``, terms holding an output label to ``B``; the
        others (depth, slice, core, λ) go wherever the two thin products are cheapest (the
        rank is the size of the labels both sides share). With several input chunks (``~pi``,
        e.g. fc2 cut into slices) ``A`` either spans all chunks, or is applied to each chunk
        (*chunked*) and ``~pi`` joins the rank. Dropout on the rank activations fixes the cut
        right after the terms holding the ``in`` axes, per input chunk (as FacT drops ``x U``).
        No cut exists when a term holds both sides (e.g. a fused ``in*out`` axis).
        """
        self.low_rank_ok, self.chunks = False, 1
        sizes: dict[str, int] = {}
        for labels, t in zip(self._labels, self.operands()):
            sizes.update(zip(labels, t.shape))
        in_axes, out_labels = set(c.in_axes), set(c.out_axes) | {PO}
        n_terms = len(self._labels)
        rank_dropout = self.dropout is not None and self.dropout_on == "rank"
        best = None
        for chunked in (False, True) if self.n_in > 1 else (False,):
            if rank_dropout and chunked != (self.n_in > 1):
                continue
            forced_in, forced_out, free = [], [], []
            for i, labels in enumerate(self._labels):
                ls = set(labels)
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
                    b_terms = [i for i in range(n_terms) if i not in a_terms]
                    a_set = {l for i in a_terms for l in self._labels[i]}
                    b_set = {l for i in b_terms for l in self._labels[i]}
                    cut = sorted(a_set & b_set - {PI}, key=str)
                    r_a = math.prod(sizes[l] for l in cut)
                    r_b = r_a * (self.n_in if chunked else 1)
                    cost = r_a * (self.n_in * self.in_chunk) + r_b * self.rows
                    if best is None or cost < best[0]:
                        best = (cost, chunked, a_terms, b_terms, cut, r_a)
        if best is None:
            return
        _, chunked, a_terms, b_terms, cut, r_a = best
        self.cut_size, self.chunks = r_a, (self.n_in if chunked else 1)
        self._cut = cut
        self._a_terms, self._b_terms = a_terms, b_terms
        a_has_pi = any(PI in self._labels[i] for i in a_terms)
        b_has_pi = any(PI in self._labels[i] for i in b_terms)
        b_has_po = any(PO in self._labels[i] for i in b_terms)
        a_out = cut + ([PI] if a_has_pi else []) + list(c.in_axes)
        b_out = ([PO] if b_has_po else []) + list(c.out_axes) + ([PI] if b_has_pi else []) + cut
        sym = Symbols()
        self.a_eq = f"{','.join(sym(self._labels[i]) for i in a_terms)}->{sym(a_out)}"
        self.b_eq = f"{','.join(sym(self._labels[i]) for i in b_terms)}->{sym(b_out)}"
        self._a_view = _single_term_view(self.a_eq, [self._labels[i] for i in a_terms], sizes)
        self._b_view = _single_term_view(self.b_eq, [self._labels[i] for i in b_terms], sizes)
        self._a_expand = self.n_in > 1 and not chunked and not a_has_pi
        self._b_expand_pi = chunked and not b_has_pi
        self._b_expand_po = self.n_out > 1 and not b_has_po
        self.low_rank_ok = True
        self._sides = {
            "a": (self.a_eq, a_terms, self._a_view, a_out),
            "b": (self.b_eq, b_terms, self._b_view, b_out),
        }
        self._plan_mix(c, sizes)
        self._plan_batches()

    def _plan_batches(self) -> None:
        """Each einsum side whose terms are sliced only by ``select`` / ``narrow`` (or not at
        all) is formed once per forward pass for all coordinates (:func:`plan_side`)."""
        tensor = self.__dict__["tensor"]
        full = list(tensor.term_labels().values())
        sizes: dict[str, int] = {}
        for name, labels in zip(self._term_names, full):
            sizes.update(zip(labels, getattr(tensor, name).shape))
        r, kr = self.cut_size, self.chunks * self.cut_size
        # the matrix each side becomes in low_rank / low_rank_mix, formed for every block at
        # once (None: the side is expanded first)
        final = {
            "a": None if self._a_expand else (r, -1),
            "b": None if self._b_expand_pi or self._b_expand_po else (-1, kr),
            "mix": (self.mix_rank, -1) if self.mix_eq is not None else None,
            "b_out": None if self.mix_eq is None or self._b_out_expand_po else (-1, self.mix_rank),
        }
        self._batched: dict[str, BatchedSide | SharedSide] = {}
        for side, (_eq, terms, view, out) in self._sides.items():
            if view is not None or len(terms) < 2:
                continue
            try:
                self._batched[side] = plan_side(
                    [self._term_names[i] for i in terms],
                    [full[i] for i in terms],
                    [self._ops[i] for i in terms],
                    sizes,
                    out,
                    final[side],
                )
            except ValueError:
                continue

    def _plan_mix(self, c: Contribution, sizes: dict[str, int]) -> None:
        """With input chunks (``B`` of rank ``k·R``): split ``B`` into ``B' M``, ``B'`` from the
        terms holding output labels and the mix ``M`` (``R' × k·R``) from the rest, when the
        rank ``R'`` they share makes the passes over ``y`` and ``gy`` cheaper:
        ``R' (k·R + rows) < k·R · rows`` per token. For FacT's fc2, ``ΔW_t = V Σ_t Uᵀ`` per
        slice ``t`` (``Σ_t`` the core times the slice factor) gives ``B' = V``, ``M = [Σ_t]``:
        rank ``R`` instead of ``4R`` against the outputs."""
        self.mix_eq = None
        if self.chunks == 1 or self._b_view is not None:
            return
        out_labels = set(c.out_axes) | {PO}
        out_terms = [i for i in self._b_terms if out_labels & set(self._labels[i])]
        mix_terms = [i for i in self._b_terms if i not in out_terms]
        cut = set(self._cut)
        out_set = {l for i in out_terms for l in self._labels[i]}
        mix_set = {l for i in mix_terms for l in self._labels[i]}
        if not out_terms or not mix_terms or PI in out_set or PI not in mix_set or cut & out_set:
            return
        cut2 = sorted(mix_set & out_set, key=str)
        r2, kr = math.prod(sizes[l] for l in cut2), self.chunks * self.cut_size
        if r2 * (kr + self.rows) >= kr * self.rows:
            return
        sym = Symbols()
        b_out = ([PO] if PO in out_set else []) + list(c.out_axes) + cut2
        self.mix_eq = f"{','.join(sym(self._labels[i]) for i in mix_terms)}->"
        self.mix_eq += sym(cut2 + [PI] + self._cut)
        self.b_out_eq = f"{','.join(sym(self._labels[i]) for i in out_terms)}->{sym(b_out)}"
        self._mix_terms, self._out_terms, self.mix_rank = mix_terms, out_terms, r2
        self._b_out_view = _single_term_view(
            self.b_out_eq, [self._labels[i] for i in out_terms], sizes
        )
        self._b_out_expand_po = self.n_out > 1 and PO not in out_set
        self._sides["mix"] = (self.mix_eq, mix_terms, None, cut2 + [PI] + self._cut)
        self._sides["b_out"] = (self.b_out_eq, out_terms, self._b_out_view, b_out)

    def _side(
        self, side: str, factors: list[torch.Tensor], cache: StepCache | None
    ) -> torch.Tensor:
        """One side of the cut (``a``, ``b``, ``mix``, ``b_out``) in its output label order:
        this coordinate's block of the all-coordinates product when ``cache`` holds it."""
        batched = self._batched.get(side) if cache is not None else None
        if batched is not None:
            block = batched.side(self.__dict__["tensor"], cache)
            if block is not None:
                return block
        equation, terms, view, _out = self._sides[side]
        if view is not None:  # one term: a view (squeeze size-1 axes, permute), no einsum
            name = self._term_names[terms[0]]
            moves = bool(view[0]) or view[1] != tuple(range(len(view[1])))
            if cache is not None and moves and not self._ops[terms[0]]:
                # an unsliced term (CaRA's A): the same matrix for every module, laid out
                # row-major once per forward pass instead of once per module
                t = getattr(self.__dict__["tensor"], name)
                key = (id(self.__dict__["tensor"]), "view", name, view)
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
        r, k = self.cut_size, self.chunks
        if self._a_expand:
            a = a.reshape(r, 1, self.in_chunk).expand(r, self.n_in, self.in_chunk)
        if self._b_expand_pi:
            b = b.reshape(-1, 1, r).expand(-1, k, r)
        if self._b_expand_po:
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
        if self._b_out_expand_po:
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
        tensor: FactorizedTensor = self.__dict__["tensor"]
        out = []
        for name, ops, labels in zip(self._term_names, self._ops, tensor.term_labels().values()):
            t = getattr(tensor, name)
            labs = list(labels)
            for op in ops:
                dim = labs.index(op[1])
                if op[0] == "select":
                    t = t.select(dim, op[2])
                    new: list[str] = []
                elif op[0] == "index":
                    idx = getattr(self, op[2])
                    t = t.index_select(dim, idx.reshape(-1)).unflatten(dim, tuple(idx.shape))
                    new = list(op[3])
                elif op[0] == "narrow":
                    t = t.narrow(dim, op[2], op[3])
                    new = list(op[4])
                else:
                    t = t.unflatten(dim, op[2])
                    new = list(op[3])
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
        return self.__dict__["bias_module"] is not None

    def bias_vector(self) -> torch.Tensor | None:
        """The shared role biases laid out on this contribution's rows (None without bias)."""
        bias = self.__dict__["bias_module"]
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
        """Whether ``contract`` is cheaper than ``materialise`` for ``n_tokens`` (cached)."""
        if self.strategy != "auto":
            return self.strategy == "contract"
        dtype = factors.dtype if isinstance(factors, LazyOperands) else factors[0].dtype
        key = (n_tokens, dtype)
        choice = self._choice.get(key)
        if choice is None:
            x_shape = (n_tokens, *self.x_view)
            shapes = (x_shape, *(tuple(f.shape) for f in factors))
            c = PLAN_CACHE.get(self.contract_eq, shapes, dtype).flops
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
            first, rest = self._stage_terms
            ops1 = [xv] + [factors[i] for i in first]
            mid = self._plan(self.stage1_eq, ops1)(*ops1)
            q = self.dropout.p  # the low-rank path's mask law, so both paths agree
            mid = mid * keep_mask(tuple(mid.shape), q, mid.device) * keep_scale(q)
            ops2 = [mid] + [factors[i] for i in rest]
            y = self._plan(self.stage2_eq, ops2)(*ops2)
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
        tensor = program.__dict__["tensor"]
        self.dtype = getattr(tensor, program._term_names[0]).dtype

    def _formed(self) -> list[torch.Tensor]:
        if self._terms is None:
            self._terms = self._program.operands()
        return self._terms

    def __getitem__(self, i):  # type: ignore[override]
        return self._formed()[i]

    def __len__(self) -> int:
        return len(self._program._term_names)

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


def _single_term_view(
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
