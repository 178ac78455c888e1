"""Several frozen linear maps with low-rank updates that read one input, in one autograd node.

``y_m = x (W_m + B_m A_m)ᵀ + b_m`` for ``m = 1…g`` (the folded form of
:class:`~tensadapt.low_rank.LowRankLinear`: float32/float64, no dropout). Run as ``g`` separate
nodes, each passes over ``x`` for ``h_m = x A_mᵀ`` and for ``gA_mᵀ = gh_mᵀ x``, and autograd
adds the ``g`` input gradients. Here:

* with the native kernels, the backward reads ``x`` and every ``gy_m`` once for all factor
  and bias gradients (:func:`tensadapt.native.factor_grads`: ``h_m`` and ``gh_m`` are formed
  block by block on the way; with a shared ``A``, ``h`` once and ``gh = Σ_m gy_m B_m``), and
  the forward has no pass over ``x`` of its own;
* otherwise ``h = x [A_1; …; A_g]ᵀ`` is one pass over ``x`` (or ``x Aᵀ`` when every member
  has the same ``A``: CaRA's q, k and v share their input-side factors);
* ``gAᵀ = ghᵀ x`` is one pass, with ``gh = [gy_1 B_1 | … | gy_g B_g]`` (shared ``A``: the sum
  ``Σ_m gy_m B_m``);
* ``gx = Σ_m gy_m W'_m`` accumulates in place into one buffer (``addmm_``);
* each ``y_m`` is its own contiguous output, and each ``gB_m = gy_mᵀ [h_m | 1]`` (the
  shared bias's gradient on the ones column) reads only its own ``gy_m``.
"""

from __future__ import annotations

import torch

from . import gemm, native
from .low_rank import folded_weight, token_product
from .precision import autocast_off

__all__ = ["SharedInputLowRank"]


class SharedInputLowRank(torch.autograd.Function):
    """``(y_1, …, y_g)`` with ``y_m = x (W_m + B_m A_m)ᵀ + b_m``; ``W_m`` frozen.

    Arguments: ``x`` (N, in); ``shared`` whether every ``A_m`` is the one passed first (only
    ``A_1`` is then used); then ``g`` weights ``W_m`` (out_m, in), ``g`` biases (out_m,) or
    None, ``g`` factors ``A_m`` (R, in) and ``g`` factors ``B_m`` (out_m, R), scale included.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, shared, *tensors):  # noqa: D102
        g = len(tensors) // 4
        ws, biases, a_list, b_list = (tensors[i * g : (i + 1) * g] for i in range(4))
        # x Aᵀ runs 1.8x slower against a column-major A
        a_list = [a_list[0].contiguous()] * g if shared else [a.contiguous() for a in a_list]
        a_all = a_list[0] if shared else torch.cat(a_list)
        needs = ctx.needs_input_grad
        # with native kernels h is left to the backward's one pass over x and every gy_m
        # (native.factor_grads), which forms it block by block
        fused = (
            g <= native.MAX_MAPS
            and any(needs[2 + 2 * g : 2 + 4 * g])
            and native.usable(x, rank=a_all.shape[0])
        )
        if fused:
            h = None
        elif native.usable(x, rank=a_all.shape[0]):
            h = native.rows_times(x, a_all.t())
        else:
            h = x @ a_all.t()
        outs, w_folds = [], []
        for m in range(g):
            w_fold = folded_weight(ws[m], a_list[m], b_list[m], 1)
            outs.append(gemm.linear(x, w_fold, biases[m]))
            w_folds.append(w_fold)
        ctx.g, ctx.shared, ctx.rank, ctx.fused = g, shared, a_list[0].shape[0], fused
        ctx.save_for_backward(x, h, a_all, *w_folds, *b_list)
        return tuple(outs)

    @staticmethod
    @autocast_off
    def backward(ctx, *gys):  # noqa: D102
        x, h, a_all, *rest = ctx.saved_tensors
        g, shared, r = ctx.g, ctx.shared, ctx.rank
        w_folds, b_list = rest[:g], rest[g:]
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_bias = needs[2 + g : 2 + 2 * g]
        need_a = any(needs[2 + 2 * g : 2 + 3 * g])
        need_b = needs[2 + 3 * g : 2 + 4 * g]
        n = x.shape[0]
        if ctx.fused:
            return _fused_backward(x, a_all, w_folds, b_list, gys, needs, r, shared)
        gx = None
        gh_parts: list[torch.Tensor | None] = []
        g_bias: list[torch.Tensor | None] = [None] * g
        g_b: list[torch.Tensor | None] = [None] * g
        for m, gy in enumerate(gys):
            if gy is None:  # an output that took no part in the loss
                gh_parts.append(None)
                continue
            gy = gy.contiguous()
            if need_x:
                gx = gemm.times(gy, w_folds[m], gx)
            gh_m = grad = None
            if need_b[m] or need_bias[m]:
                # a column slice of h has row stride g·R: copied (N × R), the native pass
                # reads contiguous rows
                h_m = h if shared else h[:, m * r : (m + 1) * r].contiguous()
                if need_bias[m]:
                    h_m = torch.cat([h_m, h_m.new_ones(n, 1)], dim=1)
                if need_a and native.usable(
                    gy, h_m, rank=h_m.shape[1]
                ):  # gy B and h_mᵀ gy in one read of gy
                    gh_m, grad = native.grad_pass(gy, b_list[m], h_m)
                else:
                    grad = token_product(h_m, gy)
                grad = grad.t()
            if need_a:
                # B transposed first: gy (N, out) times a thin (out, R) runs ~2x faster so
                gh_parts.append(gh_m if gh_m is not None else gy @ b_list[m].t().contiguous().t())
            if grad is not None:
                if need_bias[m]:
                    grad, g_bias[m] = grad[:, :-1], grad[:, -1]
                g_b[m] = grad if need_b[m] else None
        g_a: list[torch.Tensor | None] = [None] * g
        if need_a and any(p is not None for p in gh_parts):
            if shared:
                gh = sum(p for p in gh_parts if p is not None)
                g_a[0] = token_product(gh, x)
            else:
                gh = torch.cat([p if p is not None else x.new_zeros(n, r) for p in gh_parts], dim=1)
                g_a = list(token_product(gh, x).split(r))
        if not shared:
            g_a = [ga if needs[2 + 2 * g + m] else None for m, ga in enumerate(g_a)]
        return (gx, None, *([None] * g), *g_bias, *g_a, *g_b)


def _fused_backward(
    x: torch.Tensor,
    a_all: torch.Tensor,
    w_folds: list[torch.Tensor],
    b_list: list[torch.Tensor],
    gys: tuple[torch.Tensor | None, ...],
    needs: tuple[bool, ...],
    r: int,
    shared: bool,
) -> tuple[torch.Tensor | None, ...]:
    """The backward with native kernels: ``gx = Σ_m gy_m W'_m`` in one buffer, and every
    ``gA_m = (gy_m B_m)ᵀ x`` (shared: ``gA = (Σ_m gy_m B_m)ᵀ x``), ``gB_m = gy_mᵀ (x A_mᵀ)``
    and ``gb_m = 1ᵀ gy_m`` from one read of ``x`` and of each ``gy_m``
    (:func:`tensadapt.native.factor_grads`)."""
    g = len(w_folds)
    live = [m for m, gy in enumerate(gys) if gy is not None]  # outputs in the loss
    gy_live = [gys[m].contiguous() for m in live]
    gx = None
    if needs[0]:
        for m, gy in zip(live, gy_live):
            gx = gemm.times(gy, w_folds[m], gx)
    g_bias: list[torch.Tensor | None] = [None] * g
    g_a: list[torch.Tensor | None] = [None] * g
    g_b: list[torch.Tensor | None] = [None] * g
    if live:
        a_parts = [a_all] if shared else [a_all.split(r)[m] for m in live]
        out = native.factor_grads(
            x,
            gy_live,
            a_parts,
            [b_list[m] for m in live],
            shared=shared,
            biases=[needs[2 + g + m] for m in live],
        )
        for m, (ga, gb, gbias) in zip(live, out):
            g_bias[m] = gbias
            g_a[m] = ga if needs[2 + 2 * g + m] else None
            g_b[m] = gb if needs[2 + 3 * g + m] else None
        if shared:  # the one A gradient belongs to A_1, the factor the forward read
            g_a = [out[0][0] if needs[2 + 2 * g] else None] + [None] * (g - 1)
    return (gx, None, *([None] * g), *g_bias, *g_a, *g_b)
