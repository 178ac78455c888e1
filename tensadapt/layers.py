"""The wrapper placed around each adapted frozen linear map.

``y = base(x) + Σ_c s_c · (ΔW_c x)[rows_c]`` over the module's contributions (additive), or
``y = base(x) + Σ_c s_c · W[rows_c] (M_c x)`` (serial: ``ΔW = W · M``, M a square map on the
module's input). The frozen module stays at ``.base_layer``; GPT-2 ``Conv1D`` (weight stored
``in × out``) is handled here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from . import gemm
from .drop_connect import DropConnectLinear, draw_key
from .errors import AdapterStateError
from .low_rank import FOLD_DTYPES, LowRankLinear, merge_mix
from .precision import autocast_dtype, cast
from .program import ContributionProgram
from .step_cache import StepCache
from .targets import is_conv1d

if TYPE_CHECKING:  # pragma: no cover
    from .siblings import SiblingGroup

__all__ = ["AdapterState", "TensorAdapterLayer", "LowRankLinear", "LowRankOperands"]


@dataclass
class AdapterState:
    """State shared by every layer of one adapted model: whether adapters are off, and the
    factor products formed once per forward pass (cleared when the model's forward starts)."""

    disabled: bool = False
    step_cache: StepCache = field(default_factory=StepCache)


class LowRankOperands(NamedTuple):
    """``y = x Wᵀ + bias + drop_p(x Āᵀ) Mᵀ Bᵀ``: ``a`` (R, in/k), ``b`` (out, R′) scaled and
    placed on the module's rows, ``mix`` M (R′ × k·R) or None, ``k`` input chunks."""

    a: torch.Tensor
    b: torch.Tensor
    bias: torch.Tensor | None
    p: float
    k: int
    mix: torch.Tensor | None


def _row_blocks(
    programs: list[ContributionProgram], rows: int
) -> tuple[list[int], list[int]] | None:
    """``(order, gaps)`` for several contributions on contiguous, disjoint row ranges of one
    module, else None: the programs by first row, and the zero rows before each (with one
    more entry: the rows after the last)."""
    if len(programs) < 2 or not all(p.contiguous and p.chunks == 1 for p in programs):
        return None
    order = sorted(range(len(programs)), key=lambda i: programs[i].row_start)
    gaps, end = [], 0
    for i in order:
        start = programs[i].row_start
        if start < end:
            return None
        gaps.append(start - end)
        end = start + programs[i].out_rows
    if end > rows:
        return None
    gaps.append(rows - end)
    return order, gaps


class TensorAdapterLayer(nn.Module):
    """A frozen linear (``nn.Linear`` or ``Conv1D``) plus its tensor-adapter contributions."""

    def __init__(
        self,
        base_layer: nn.Module,
        programs: list[ContributionProgram],
        state: AdapterState,
        name: str = "",
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.programs = nn.ModuleList(programs)
        self.__dict__["state"] = state
        self.module_name = name
        self.merged = False
        self.conv1d = is_conv1d(base_layer)
        #: separate q/k/v modules that read this module's input, run as one map when they do
        self.siblings: SiblingGroup | None = None
        self.input_dropout = next(
            (p.dropout for p in programs if p.dropout is not None and p.dropout_on == "input"),
            None,
        )
        #: the contributions with shared role biases (fixed when the programs are built)
        self._bias_programs = [p for p in programs if p.has_bias]
        #: several contributions on disjoint row ranges: their ``B`` blocks in row order
        self._row_blocks = _row_blocks(programs, self.weight_out_in().shape[0])

    # ------------------------------------------------------------------ weights
    def weight_out_in(self) -> torch.Tensor:
        """The frozen weight in ``(out, in)`` layout (a view for ``Conv1D``)."""
        w = self.base_layer.weight
        return w.t() if self.conv1d else w

    @property
    def weight(self) -> torch.Tensor:  # for code that reads ``module.weight``
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def delta_weight(self) -> torch.Tensor:
        """``Σ_c s_c ΔW_c`` placed at its rows: the dense ``(out, in)`` update (adapter dtype)."""
        w = self.weight_out_in()
        dtype = self.programs[0].operands()[0].dtype
        total = torch.zeros(w.shape, dtype=dtype, device=w.device)
        for p in self.programs:
            d = p.delta()
            if p.serial:
                d = w.to(dtype).index_select(0, p._rows) @ d
            total.index_add_(0, p._rows, d, alpha=p.scale)
        return total

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.merged or self.state.disabled:
            return self.base_layer(x, *args, **kwargs)
        amp = autocast_dtype(x)
        if amp is not None:
            return self._forward_autocast(x, amp, *args, **kwargs)
        if not (args or kwargs):
            if self.siblings is not None:
                fused = self.siblings.forward(self, x)
                if fused is not None:
                    return fused
            factors = self._factors_for(x)
            if factors is not None:
                fast = self._forward_low_rank(x, factors)
                if fast is None:
                    fast = self._forward_drop_connect(x, factors)
                if fast is None:
                    fast = self._forward_folded(x, factors)
                if fast is not None:
                    return fast
        return self._forward_general(x, *args, **kwargs)

    def _forward_autocast(self, x: torch.Tensor, dtype: torch.dtype, *args, **kwargs):
        """The forward under autocast, whose matmuls run in ``dtype`` (:mod:`~tensadapt.precision`).

        A low-rank call runs as one :class:`LowRankLinear` in ``dtype``: its operands are
        formed in the factors' dtype with autocast off, then cast once, so the update is
        added in the dtype of the base output and ``W + ΔW`` is never rounded to half
        precision. Other calls (DropConnect, a materialised update, extra arguments) take
        the general path: autocast runs the base map and the update, which is cast to the
        base output's dtype before it is added."""
        if not (args or kwargs) and not self.weight_out_in().requires_grad:
            n = x.numel() // x.shape[-1]
            factors = [p.lazy_operands() for p in self.programs]
            with torch.autocast(x.device.type, enabled=False):
                op = self._low_rank_operands(n, factors)
                if op is not None:
                    return self._run_low_rank(x, op, dtype)
        return self._forward_general(x, *args, **kwargs)

    def _factors_for(self, x: torch.Tensor) -> list[list[torch.Tensor]] | None:
        """Each program's sliced factors when ``x``, ``W`` and the factors share a dtype and
        ``W`` is frozen (the two fused paths' precondition), else None."""
        w = self.weight_out_in()
        if w.requires_grad or x.dtype != w.dtype:
            return None
        factors = [p.lazy_operands() for p in self.programs]
        if any(f.dtype != w.dtype for f in factors):
            return None
        return factors

    def _shared_bias(self) -> torch.Tensor | None:
        """``b + Σ_c s_c b_c``: the frozen bias plus the adapters' shared role biases."""
        bias = self.bias
        for p in self._bias_programs:
            vec = p.bias_vector()
            if p.full:  # on every row: one op, b + s·b_c
                bias = vec * p.scale if bias is None else torch.add(bias, vec, alpha=p.scale)
                continue
            rows = self.weight_out_in().shape[0]
            vec = vec.new_zeros(rows).index_add(0, p._rows, vec, alpha=p.scale)
            bias = vec if bias is None else bias + vec
        return bias

    def _forward_drop_connect(
        self, x: torch.Tensor, factors: list[list[torch.Tensor]]
    ) -> torch.Tensor | None:
        """``y = x (W + s·c·(m ⊙ B A))ᵀ + b + s·b_c`` as one :class:`DropConnectLinear` call, or
        None: for a single contribution on all rows with DropConnect active and a low-rank
        form ``ΔW = B A`` (no serial map, chunks or input dropout)."""
        if len(self.programs) != 1 or self.input_dropout is not None:
            return None
        p, f = self.programs[0], factors[0]
        if not (p.drops_delta() and p.low_rank_ok and p.full) or p.serial or p.chunks != 1:
            return None
        w = self.weight_out_in()
        if w.dtype not in FOLD_DTYPES:
            return None
        a, b = p.low_rank(f, self.state.step_cache)
        n = x.numel() // x.shape[-1]
        x2d = x.reshape(n, x.shape[-1])
        out = DropConnectLinear.apply(
            x2d, w, self._shared_bias(), a, b * p.scale, float(p.dropout.p), draw_key()
        )
        return out.view(*x.shape[:-1], w.shape[0])

    def _forward_folded(
        self, x: torch.Tensor, factors: list[list[torch.Tensor]]
    ) -> torch.Tensor | None:
        """``y = x (W + Σ_c s_c drop(ΔW_c))ᵀ + b + Σ_c s_c b_c`` as one matmul, or None.

        For modules whose every contribution is materialised (the planned choice, or
        DropConnect on ``ΔW``): the dense updates are folded into the frozen weight, so the
        forward and the input gradient each pass once over the activations instead of twice.
        Not taken with input or rank dropout (they need ``x`` or the rank activations apart).
        """
        if self.input_dropout is not None:
            return None
        n = x.numel() // x.shape[-1]
        for p, f in zip(self.programs, factors):
            if p.rank_dropout() or not p.materialises(n, f):
                return None
        w = self.weight_out_in()
        weight = w
        for p, f in zip(self.programs, factors):
            d, scale = p.delta(f), p.scale
            if p.drops_delta():
                d, factor = p.drop_connect(d)
                scale *= factor
            if p.serial:
                d = w.index_select(0, p._rows) @ d
            weight = p.add_weight_rows(weight, d, scale)
        return gemm.dense_linear(x, weight, self._shared_bias())

    def _low_rank_operands(
        self, n: int, factors: list[list[torch.Tensor]]
    ) -> LowRankOperands | None:
        """The operands of ``x Āᵀ Mᵀ Bᵀ`` summed over the contributions, for ``n`` tokens,
        or None when a contribution does not take the low-rank path."""
        if not all(p.fast_path(n, f) for p, f in zip(self.programs, factors)):
            return None
        w = self.weight_out_in()
        drop = {p.rank_dropout() for p in self.programs}
        chunks = {p.chunks for p in self.programs}
        if len(drop) > 1 or len(chunks) > 1 or (len(self.programs) > 1 and chunks != {1}):
            return None
        if self._row_blocks is not None:
            a, b = self._block_diagonal(w, factors)
            return LowRankOperands(a, b, self._shared_bias(), drop.pop(), 1, None)
        rows = w.shape[0]
        a_parts, b_parts, mix = [], [], None
        for p, f in zip(self.programs, factors):
            if len(self.programs) == 1:
                a, b, mix = p.low_rank_mix(f, self.state.step_cache)
            else:
                a, b = p.low_rank(f, self.state.step_cache)
            if p.serial:
                b = w.index_select(0, p._rows).to(b.dtype) @ b
            if p.scale != 1.0:  # a multiply by one would still be an autograd node
                b = b * p.scale
            if not p.full:
                b = b.new_zeros(rows, b.shape[1]).index_add(0, p._rows, b)
            a_parts.append(a)
            b_parts.append(b)
        a = a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts)
        b = b_parts[0] if len(b_parts) == 1 else torch.cat(b_parts, dim=1)
        return LowRankOperands(a, b, self._shared_bias(), drop.pop(), chunks.pop(), mix)

    def _block_diagonal(
        self, w: torch.Tensor, factors: list[list[torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = [A_1; …; A_m]`` and ``B = diag(s_1 B_1, …, s_m B_m)``, zero rows between the
        blocks: contributions on disjoint row ranges (q, k and v of a fused ``qkv``) as one
        map of rank ``Σ R_c``, in one ``block_diag`` (and one backward node) for all of them."""
        order, gaps = self._row_blocks
        scale = self.programs[0].scale
        if any(p.scale != scale for p in self.programs):
            scale = None
        a_parts, blocks = [], []
        for i, gap in zip(order, gaps):
            p = self.programs[i]
            a, b = p.low_rank(factors[i], self.state.step_cache)
            if p.serial:
                b = w.index_select(0, p._rows).to(b.dtype) @ b
            if gap:
                blocks.append(b.new_zeros(gap, 0))
            blocks.append(b if scale is not None else b * p.scale)
            a_parts.append(a)
        if gaps[-1]:
            blocks.append(blocks[-1].new_zeros(gaps[-1], 0))
        b = torch.block_diag(*blocks)
        return torch.cat(a_parts), (b if scale is None or scale == 1.0 else b * scale)

    def _forward_low_rank(
        self, x: torch.Tensor, factors: list[list[torch.Tensor]]
    ) -> torch.Tensor | None:
        """Every contribution as ``x Āᵀ Mᵀ Bᵀ`` in one :class:`LowRankLinear` call, or None."""
        n = x.numel() // x.shape[-1]
        op = self._low_rank_operands(n, factors)
        if op is None:
            return None
        return self._run_low_rank(x, op)

    def _run_low_rank(
        self, x: torch.Tensor, op: LowRankOperands, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """``op`` as one :class:`LowRankLinear` call, every operand cast to ``dtype`` first
        when one is given (autocast's compute dtype)."""
        w = self.weight_out_in()
        x2d = x.reshape(-1, x.shape[-1])
        a, b, bias, mix, k = op.a, op.b, op.bias, op.mix, op.k
        if dtype is not None:
            x2d, w, a, b, bias, mix = (cast(t, dtype) for t in (x2d, w, a, b, bias, mix))
        xa = None
        if self.input_dropout is not None and self.input_dropout.training:
            xa = self.input_dropout(x2d)
        if mix is not None and xa is None and op.p == 0.0 and w.dtype in FOLD_DTYPES:
            a, mix, k = merge_mix(a, mix, k, tuple(w.shape))
        out = LowRankLinear.apply(x2d, xa, w, bias, a, b, op.p, k, mix)
        return out.view(*x.shape[:-1], w.shape[0])

    def _forward_general(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        shape = out.shape
        out2d = out.reshape(-1, shape[-1])
        dtype = self.programs[0].operands()[0].dtype
        xa = x.reshape(-1, x.shape[-1]).to(dtype)
        if self.input_dropout is not None:
            xa = self.input_dropout(xa)
        for p in self.programs:
            y = p.apply_x(xa)
            bias = p.bias_vector()
            if bias is not None:
                y = y + bias
            if p.serial:
                w = self.weight_out_in().index_select(0, p._rows)
                y = y.to(w.dtype) @ w.t()
            out2d = p.add_rows(out2d, y, p.scale)
        return out2d.view(shape)

    # ------------------------------------------------------------------ merging
    @torch.no_grad()
    def merge(self) -> None:
        """Add ``s·ΔW`` into the frozen weight in place."""
        if self.merged:
            raise AdapterStateError(f"{self.module_name} is already merged; unmerge it first")
        if self.bias is None and any(p.bias_vector() is not None for p in self.programs):
            raise AdapterStateError(
                f"{self.module_name} has no bias to merge the adapter's shared bias into; "
                "keep the adapter unmerged"
            )
        delta = self.delta_weight()
        w = self.weight_out_in()
        # one rounding of the exact sum (a bf16 weight is not hit by a rounded delta)
        w.copy_(w.to(delta.dtype).add_(delta).to(w.dtype))
        self._merge_bias(+1.0)
        self.merged = True

    def delta_bias(self) -> torch.Tensor | None:
        """``s·b`` of the shared role biases on this module's rows, or None without bias."""
        total = None
        for p in self.programs:
            b = p.bias_vector()
            if b is None:
                continue
            if total is None:
                total = torch.zeros(self.weight_out_in().shape[0], dtype=b.dtype, device=b.device)
            total.index_add_(0, p._rows, b, alpha=p.scale)
        return total

    def _merge_bias(self, sign: float) -> None:
        delta = self.delta_bias()
        if delta is None:
            return
        self.bias.add_(delta.to(self.bias.dtype), alpha=sign)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weight (additive: subtract ``s·ΔW``; serial: solve for W)."""
        if not self.merged:
            raise AdapterStateError(f"{self.module_name} is not merged; nothing to unmerge")
        w = self.weight_out_in()
        if any(p.serial for p in self.programs):
            self._unmerge_serial(w)
        else:
            delta = self.delta_weight()
            w.copy_(w.to(delta.dtype).sub_(delta).to(w.dtype))
        self._merge_bias(-1.0)
        self.merged = False

    def _unmerge_serial(self, w: torch.Tensor) -> None:
        for p in self.programs:
            m = p.delta()
            eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
            rows = w.index_select(0, p._rows).to(m.dtype)
            # W_merged = W (I + s M)  ->  W = W_merged (I + s M)^-1
            restored = torch.linalg.solve(eye + p.scale * m, rows, left=False)
            w.index_copy_(0, p._rows, restored.to(w.dtype))
