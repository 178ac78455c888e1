"""One autograd function for a frozen linear map plus a low-rank update.

``y = x Wᵀ + b + drop(x' Aᵀ) Bᵀ`` with ``W`` frozen (``B`` already scaled), written so that
the update costs as few passes over the big activations as possible:

* **folded** (float32/float64, no input or rank dropout): ``W' = W + B Ā`` is formed (an
  ``out × in`` product of rank ``R``, cheap next to a token-sized pass) and the forward is one
  matmul ``y = x W'ᵀ + b``. In the backward ``gy W'`` is the input gradient, with
  ``gh = gy B`` from the same matmul ``gy [W' | B]`` unless ``gy`` is narrower than ``x``.
  What remains is ``h = x Aᵀ`` (forward), ``gAᵀ = ghᵀ x`` and ``gB = gyᵀ h``: three thin
  passes per module.
* **unfolded** (half precision, where ``W + B Ā`` would round the update away; input or rank
  dropout, where ``x' ≠ x`` or ``h`` is masked): the low-rank term is accumulated into the base
  output in place (``addmm_``) and ``gh A`` into the input gradient.

``Ā`` is ``A`` itself, or, with ``k`` input chunks, ``A`` applied to each chunk of ``x``
(block-diagonal: ``h`` then has ``k·R`` columns, chunk-major). Shared biases ride on the ``B``
gradient: ``gyᵀ [h | 1]``.
"""

from __future__ import annotations

import torch

__all__ = ["LowRankLinear", "FOLD_DTYPES", "block_product", "folded_weight", "token_product"]

FOLD_DTYPES = (torch.float32, torch.float64)


def rank_activations(src: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """``h = src Āᵀ``: ``(N, k·R)``, each input chunk of ``src`` against ``A`` when ``k > 1``."""
    n = src.shape[0]
    if k > 1:
        return (src.reshape(n * k, -1) @ a.t()).view(n, -1)
    return src @ a.t()


def block_product(bm: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """``B Ā`` of shape ``(out, k·in_chunk)``: column block ``j`` is ``B[:, jR:(j+1)R] A``."""
    if k == 1:
        return bm @ a
    out = bm.shape[0]
    blocks = bm.view(out, k, -1).transpose(0, 1) @ a  # (k, out, in_chunk)
    return blocks.transpose(0, 1).reshape(out, -1)


def folded_weight(w: torch.Tensor, a: torch.Tensor, bm: torch.Tensor, k: int) -> torch.Tensor:
    """``W' = W + B Ā`` of shape ``(out, in)``."""
    if k == 1:
        return torch.addmm(w, bm, a)
    return w + block_product(bm, a, k)


def token_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``uᵀ v`` for a thin ``u`` (N, R) and ``v`` (N, M): a reduction over the N tokens.

    Run as a batched product over blocks of tokens, then a sum over the blocks: one BLAS call
    with a small ``R`` and a long reduction ran 25-40 % slower on a 2-core CPU.
    """
    n = u.shape[0]
    blocks = next((c for c in (8, 4, 2) if n % c == 0 and n // c >= 64), 1)
    if blocks == 1:
        return u.t() @ v
    m = n // blocks
    return torch.bmm(u.reshape(blocks, m, -1).transpose(1, 2), v.reshape(blocks, m, -1)).sum(0)


def _with_b(weight: torch.Tensor, bm: torch.Tensor) -> torch.Tensor:
    """``[weight | B]``: ``(out, in + k·R)``, for ``gy [W | B]`` in one matmul."""
    return torch.cat([weight, bm], dim=1)


class LowRankLinear(torch.autograd.Function):
    """``y = x Wᵀ + b + drop(x' Āᵀ) Bᵀ`` (``W`` frozen) with a hand-written backward.

    Arguments: ``x`` (N, in); ``xa`` the input-dropped copy of ``x`` or None; ``w`` (out, in)
    frozen; ``b`` (out,) or None; ``a`` (R, in / k); ``bm`` (out, k·R), scale included; ``p``
    dropout probability on the rank activations; ``k`` input chunks.
    """

    @staticmethod
    def forward(ctx, x, xa, w, b, a, bm, p, k):  # noqa: D102
        fold = xa is None and p == 0.0 and w.dtype in FOLD_DTYPES
        src = x if xa is None else xa
        n = x.shape[0]
        if fold:
            weight = folded_weight(w, a, bm, k)
            out = torch.addmm(b, x, weight.t()) if b is not None else x @ weight.t()
            h = rank_activations(src, a, k)
            mask = None
        else:
            out = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
            h = rank_activations(src, a, k)
            mask = None
            if p > 0.0:
                h, mask = torch.native_dropout(h, p, True)
            out.addmm_(h, bm.t())
        if ctx.needs_input_grad[3]:
            # the bias gradient rides on the B gradient: gyᵀ [h | 1] in one pass over gy
            h = torch.cat([h, h.new_ones(n, 1)], dim=1)
        ctx.has_xa, ctx.k, ctx.p, ctx.fold = xa is not None, k, p, fold
        ctx.save_for_backward(src, w, a, bm, h, mask)
        return out

    @staticmethod
    def backward(ctx, gy):  # noqa: D102
        src, w, a, bm, h, mask = ctx.saved_tensors
        need_x, need_xa, _, need_b, need_a, need_bm, _, _ = ctx.needs_input_grad
        k, n, d_in = ctx.k, gy.shape[0], w.shape[1]
        gx = gxa = gb = ga = gbm = None
        need_gh = need_xa or need_a or (need_x and not ctx.fold)
        gh = None
        if need_x:
            weight = folded_weight(w, a, bm, k) if ctx.fold else w
            if need_gh and w.shape[0] >= w.shape[1]:
                # gy is not the narrower side: one matmul gives gy W' and gh = gy B; gx is
                # copied out of the wider buffer (a strided gradient slows e.g. GELU backward)
                both = gy @ _with_b(weight, bm)
                gx, gh = both[:, :d_in].contiguous(), both[:, d_in:]
            else:
                gx = gy @ weight
        if need_gh and gh is None:
            gh = gy @ bm
        if gh is not None:
            if mask is not None:
                gh = torch.ops.aten.native_dropout_backward(gh, mask, 1.0 / (1.0 - ctx.p))
            if k > 1:
                gh = gh.reshape(n * k, -1)
        if need_x and not ctx.fold and not ctx.has_xa:
            (gx.view(n * k, -1) if k > 1 else gx).addmm_(gh, a)
        if need_xa:
            gxa = (gh @ a).view(n, -1)
        if need_a:
            ga = token_product(gh, src.reshape(gh.shape[0], -1))
        if need_bm or need_b:
            g = token_product(h, gy).t()  # (hᵀ gy)ᵀ: several times faster than gyᵀ h
            if need_b:
                g, gb = g[:, :-1], g[:, -1]
            gbm = g if need_bm else None
        return gx, gxa, None, gb, ga, gbm, None, None
