"""One autograd function for a frozen linear map plus a low-rank update.

``y = x Wᵀ + b + drop(x' Aᵀ) Bᵀ`` with ``W`` frozen (``B`` already scaled), written so that
the update costs as few passes over the big activations as possible:

* **folded** (float32/float64, no input or rank dropout): ``W' = W + B Ā`` is formed once a
  step (an ``out × in`` product of rank ``R``, cheap next to a token-sized pass) and kept for
  the backward; the forward is one matmul ``y = x W'ᵀ + b``. In the backward ``gy W'`` is
  the input gradient. What remains is ``h = x Aᵀ``, ``gh = gy B``, ``gAᵀ = ghᵀ x`` and
  ``gB = gyᵀ h``. With :mod:`tensadapt.native` (float32 on an AVX2 CPU), for a plain ``B A``
  all four, and a trained bias's ``1ᵀ gy``, come from one read of ``x`` and ``gy`` in the
  backward (:func:`tensadapt.native.factor_grads`, block by block of tokens), and the forward
  has no pass of its own; with chunks or a mix they are three passes, each one read of an
  activation (``h`` in the forward; ``gh`` and ``gB`` share the read of ``gy``).
  Without native kernels ``gh`` comes from the widened matmul ``gy [W' | B]`` unless ``gy``
  is narrower than ``x``, and the others run on BLAS.
* **unfolded** (half precision, where ``W + B Ā`` would round the update away; input or rank
  dropout, where ``x' ≠ x`` or ``h`` is masked): the thin products come first, ``b + h Bᵀ``
  and ``gh A``, and the big ones accumulate into them (``addmm_``, or oneDNN's matmul adding
  them as it writes: :mod:`tensadapt.gemm`): a big matmul reads its output while it
  computes, where a thin one added afterwards would be one more memory-bound pass over ``y``
  or ``gx``.

``Ā`` is ``A`` itself, or, with ``k`` input chunks, ``A`` applied to each chunk of ``x``
(block-diagonal: ``h`` then has ``k·R`` columns, chunk-major). An optional mix ``M``
(``R' × k·R``) sits between: ``ΔW = B M Ā``; unfolded, ``y`` and ``gy`` then meet rank-``R'``
activations ``h Mᵀ`` instead of the ``k·R`` of ``h`` (FacT's fc2: ``R' = R``, ``k = 4``).
Shared biases ride on the ``B`` gradient: ``gyᵀ [h | 1]``."""

from __future__ import annotations

import math

import torch

from . import gemm, native
from .precision import autocast_off

__all__ = [
    "LowRankLinear",
    "FOLD_DTYPES",
    "block_product",
    "folded_weight",
    "thin_expand",
    "keep_mask",
    "keep_scale",
    "merge_mix",
    "token_product",
]

FOLD_DTYPES = (torch.float32, torch.float64)


KEEP_BITS = 16  # each keep decision reads 16 random bits: four per 64-bit draw


def quantised_p(p: float) -> float:
    """``p′ = round(p·2¹⁶) / 2¹⁶``: the drop probability :func:`keep_mask` realises
    (``|p′ − p| ≤ 2⁻¹⁷``)."""
    return round(p * 2**KEEP_BITS) / 2**KEEP_BITS


def keep_scale(p: float) -> float:
    """``1 / (1 − p′)``: the factor that makes ``E[m / (1 − p′)] = 1`` for the mask of
    :func:`keep_mask` (0 when ``p′ = 1``, where every entry is dropped)."""
    q = quantised_p(p)
    return 0.0 if q >= 1.0 else 1.0 / (1.0 - q)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """Dropout's keep mask ``m ~ Bernoulli(1 − p′)``, ``p′`` from :func:`quantised_p`.

    Each entry keeps when a uniform 16-bit integer ``u`` (signed, ``[−2¹⁵, 2¹⁵)``) satisfies
    ``u + 2¹⁵ ≥ round(p·2¹⁶)``; four ``u`` are cut from each uniform 64-bit draw (the
    generator's cost is per draw). On CPU that is 3× cheaper than one ``U(0, 1)`` float per
    entry and 4-5× cheaper than ``bernoulli_``. Scale kept entries by :func:`keep_scale`, not
    ``1 / (1 − p)``, for an unbiased mask."""
    threshold = round(p * 2**KEEP_BITS)
    if threshold >= 2**KEEP_BITS:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if torch.compiler.is_compiling():  # the same law, drawn out of place (traceable)
        u = torch.randint(0, 2**KEEP_BITS, shape, dtype=torch.int32, device=device)
        return u >= threshold
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), None)  # every 64-bit pattern
    return (words.view(torch.int16)[:numel] >= threshold - 2**15).view(shape)


def rank_dropout(h: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m ⊙ h / (1 − p′), m)``, in place on ``h`` (a fresh activation)."""
    keep = keep_mask(tuple(h.shape), p, h.device)
    return h.mul_(keep).mul_(keep_scale(p)), keep


def rank_activations(src: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """``h = src Āᵀ``: ``(N, k·R)``, each input chunk of ``src`` against ``A`` when ``k > 1``."""
    n = src.shape[0]
    z = src.reshape(n * k, -1) if k > 1 else src  # chunk-major rows: (N·k, in / k)
    h = native.rows_times(z, a.t()) if native.usable(z, rank=a.shape[0]) else z @ a.t()
    return h.view(n, -1)


def block_product(bm: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    """``B Ā`` of shape ``(out, k·in_chunk)``: column block ``j`` is ``B[:, jR:(j+1)R] A``."""
    if k == 1:
        return bm @ a
    out = bm.shape[0]
    blocks = bm.view(out, k, -1).transpose(0, 1) @ a  # (k, out, in_chunk)
    return blocks.transpose(0, 1).reshape(out, -1)


def merge_mix(
    a: torch.Tensor, mix: torch.Tensor, k: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(A', None, 1)`` with ``A' = M Ā`` (``R' × in``) when that is no dearer, else
    ``(a, mix, k)`` unchanged.

    For a folded update (no rank dropout to keep ``h`` apart) ``ΔW = B M Ā = B A'``, so the
    map runs as a plain rank-``R'`` one: ``h = x A'ᵀ`` and the passes over ``gy`` have rank
    ``R'`` instead of ``k·R``. Per token, the passes cost ``R'·(in + out)`` instead of
    ``R·in + k·R·out``; ``shape`` is ``(out, in)``. ``M Ā`` is ``R' × in``, formed by autograd
    ops, which carry its gradient back to ``M`` and ``A``.
    """
    out, d_in = shape
    r_mix, kr = mix.shape
    if r_mix * (d_in + out) > (kr // k) * d_in + kr * out:
        return a, mix, k
    return block_product(mix, a, k), None, 1


def thin_expand(u: torch.Tensor, p: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
    """``c + u P`` for a thin ``u`` (N, R) and ``P`` (R, M); ``c`` None, a row or (N, M).

    In native code where :func:`tensadapt.native.usable` (each output tile in registers over
    the rank, one write of the output); CPU BLAS runs these shapes at a third to a half of
    the FMA peak (``benchmarks/HISTORY.md``). Not differentiable: for use inside a backward or an
    autograd function's forward."""
    others = (p,) if c is None else (p, c)
    if native.usable(u, rank=u.shape[1], expand=True) and all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype == u.dtype
        and t.device == u.device
        for t in others
    ):
        return native.rows_expand(u, p, c)
    return u @ p if c is None else torch.addmm(c, u, p)


def folded_weight(w: torch.Tensor, a: torch.Tensor, bm: torch.Tensor, k: int) -> torch.Tensor:
    """``W' = W + B Ā`` of shape ``(out, in)``."""
    if k == 1:
        return thin_expand(bm.contiguous(), a, w)
    return w + block_product(bm, a, k)


def token_product(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``uᵀ v`` for a thin ``u`` (N, R) and ``v`` (N, M): a reduction over the N tokens.

    One read of ``v`` in native code where :func:`tensadapt.native.usable`; else a batched
    product over blocks of tokens, then a sum over the blocks: one BLAS call with a small ``R``
    and a long reduction ran 25-40 % slower on a 2-core CPU.
    """
    if native.usable(u, v, rank=u.shape[1]):
        return native.cols_reduce(u, v)
    n = u.shape[0]
    blocks = next((c for c in (8, 4, 2) if n % c == 0 and n // c >= 64), 1)
    if blocks == 1:
        return u.t() @ v
    m = n // blocks
    return torch.bmm(u.reshape(blocks, m, -1).transpose(1, 2), v.reshape(blocks, m, -1)).sum(0)


class LowRankLinear(torch.autograd.Function):
    """``y = x Wᵀ + b + drop(x' Āᵀ) Mᵀ Bᵀ`` (``W`` frozen) with a hand-written backward.

    Arguments: ``x`` (N, in); ``xa`` the input-dropped copy of ``x`` or None; ``w`` (out, in)
    frozen; ``b`` (out,) or None; ``a`` (R, in / k); ``bm`` (out, k·R), scale included, or
    ``(out, R')`` with a mix; ``p`` dropout probability on the rank activations; ``k`` input
    chunks; ``mix`` None (``M = I``) or ``M`` of shape ``(R', k·R)``: middle factors kept
    apart from ``B`` when ``R' < k·R``, so the passes over ``y`` and ``gy`` have rank ``R'``.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, xa, w, b, a, bm, p, k, mix=None):  # noqa: D102
        fold = xa is None and p == 0.0 and w.dtype in FOLD_DTYPES
        src = x if xa is None else xa
        # a factor product often arrives as the transpose of an (in, R) matrix; x Aᵀ against
        # that layout runs 1.8x slower at rank 8 than against a row-major A (R × in: a few kB)
        a = a.contiguous()
        n = x.shape[0]
        w_fold = mask = None
        # the plain folded map with native kernels: h = x Aᵀ is left to the backward's one
        # pass over x and gy (native.factor_grads), which forms it block by block
        fused = (
            fold
            and k == 1
            and mix is None
            and (ctx.needs_input_grad[4] or ctx.needs_input_grad[5])
            and native.usable(x, rank=a.shape[0])
        )
        h = None if fused else rank_activations(src, a, k)
        if fold:
            b_eff = bm if mix is None else bm @ mix
            weight = folded_weight(w, a, b_eff, k)
            if ctx.needs_input_grad[0]:
                w_fold = weight  # W' kept for the input gradient: formed once a step
            out = gemm.linear(x, weight, b)
            hb = h  # what the B gradient contracts gy with
        else:
            if p > 0.0:
                h, mask = rank_dropout(h, p)
            hb = h if mix is None else h @ mix.t()
            # the thin product first, then the big one accumulates into it: the big matmul
            # reads its output tile by tile while it computes, where a thin one added after
            # it would be one more memory-bound pass reading and writing y
            out = gemm.times(x, w.t(), thin_expand(hb, bm.t(), b))
        if ctx.needs_input_grad[3] and not fused:
            # the bias gradient rides on the B gradient: gyᵀ [hb | 1] in one pass over gy
            hb = torch.cat([hb, hb.new_ones(n, 1)], dim=1)
        ctx.has_xa, ctx.k, ctx.p, ctx.fold, ctx.fused = xa is not None, k, p, fold, fused
        h_mix = h if mix is not None and not fold else None  # for gM = ggᵀ h
        ctx.save_for_backward(src, w, a, bm, h_mix, hb, mask, mix, w_fold)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, gy):  # noqa: D102
        src, w, a, bm, h, hb, mask, mix, w_fold = ctx.saved_tensors
        need_x, need_xa, _, need_b, need_a, need_bm, _, _, *rest = ctx.needs_input_grad
        need_mix = bool(rest and rest[0])
        k, n, d_in, fold = ctx.k, gy.shape[0], w.shape[1], ctx.fold
        gx = gxa = gb = ga = gbm = gmix = None
        if ctx.fused:  # one read of x and gy for the factor and bias gradients
            gy = gy.contiguous()
            ((ga, gbm, gb),) = native.factor_grads(src, [gy], [a], [bm], biases=[need_b])
            gx = gemm.times(gy, w_fold) if need_x else None
            grads = (gx, None, None, gb, ga if need_a else None, gbm if need_bm else None)
            return (*grads, None, None, None)[: len(ctx.needs_input_grad)]
        need_gh = need_xa or need_a or (need_x and not fold)
        # gg = gy B_eff, the B the forward multiplied by: (out, k·R) folded (B M), else
        # (out, R') with a mix; then gh = gg M (unfolded with a mix) or gg
        need_gg = need_gh or (need_mix and not fold)
        b_eff = bm @ mix if fold and mix is not None else bm
        gg = g_hb = None
        if need_gg and (need_bm or need_b or need_mix) and native.usable(gy, hb, rank=hb.shape[1]):
            gg, g_hb = native.grad_pass(gy, b_eff, hb)  # gy B and hbᵀ gy in one read of gy
        if need_x and fold:
            if gg is None and need_gg and w.shape[0] >= w.shape[1]:
                # gy is not the narrower side: gy [W' | B] gives both in one matmul; gx is
                # copied out of the wider buffer (a strided gradient slows e.g. GELU backward)
                both = gemm.times(gy, torch.cat([w_fold, b_eff], dim=1))
                gx, gg = both[:, :d_in].contiguous(), both[:, d_in:]
            else:
                gx = gemm.times(gy, w_fold)
        if need_gg and gg is None:
            # B transposed to (R, out) first: gy (N, out) times a thin (out, R) operand in
            # this orientation runs about twice as fast on CPU BLAS
            gg = gy @ b_eff.t().contiguous().t()
        if need_gh:
            gh = gg @ mix if mix is not None and not fold else gg
            if mask is not None:
                gh = torch.where(mask, gh, 0.0).mul_(keep_scale(ctx.p))
            if k > 1:
                gh = gh.reshape(n * k, -1)
            if need_x and not fold and not ctx.has_xa:
                # gh A first, then gy W accumulates into it (as in the forward)
                gx = gemm.times(gy, w, thin_expand(gh, a).view(n, -1))
            if need_xa:
                gxa = thin_expand(gh, a).view(n, -1)
            if need_a:
                ga = token_product(gh, src.reshape(gh.shape[0], -1))
        if need_x and gx is None:
            gx = gy @ w
        if need_bm or need_b or need_mix:
            # (hbᵀ gy)ᵀ: several times faster than gyᵀ hb
            g = (g_hb if g_hb is not None else token_product(hb, gy)).t()
            if need_b:
                g, gb = g[:, :-1], g[:, -1]
            if mix is not None and fold:  # g is the gradient of B M
                gbm = g @ mix.t() if need_bm else None
                gmix = bm.t() @ g if need_mix else None
            else:
                gbm = g if need_bm else None
                gmix = token_product(gg, h) if need_mix else None
        grads = (gx, gxa, None, gb, ga, gbm, None, None, gmix)
        return grads[: len(ctx.needs_input_grad)]
