"""DropConnect on ``ΔW``: a hashed keep mask, and the update folded into the frozen weight.

DropConnect (the CaRA preset's dropout) masks each entry of the update itself:

    y = x (W + s·c·(m ⊙ ΔW))ᵀ + b,    m_ij ~ Bernoulli(1 − p′),  c = 1 / (1 − p′)

with ``p′ = round(p·2¹⁶) / 2¹⁶`` (:func:`~tensadapt.low_rank.quantised_p`). Entry ``e`` of the
row-major ``(out, in)`` matrix keeps when ``(h(e) >> 16) ≥ round(p·2¹⁶)``, where
``h(e) = f(f(e ⊕ k₀) ⊕ k₁)``, ``f`` a 32-bit integer finaliser (a bijection with full
avalanche) and ``(k₀, k₁)`` two 32-bit draws from torch's generator per call (:func:`draw_key`).
So the mask follows ``torch.manual_seed``, does not depend on the thread count or the device,
and the native CPU passes draw it again in the backward instead of storing it. The PyTorch
form (any device; the oracle of the native one) hashes it once per call in the forward, in
22 elementwise int64 ops (``x·c mod 2³²`` as one product and one mask, :func:`_mul32`), and
keeps the boolean mask for the backward.

:class:`DropConnectLinear` is the path for an update of the form ``ΔW = B A`` (rank ``R``):
``W′ = W + s·c·(m ⊙ B A)`` is formed in one pass (native code for float32 on CPU), the forward
and the input gradient each make one matmul with ``W′``, and the factor gradients contract the
masked weight gradient ``G = c·(m ⊙ gyᵀ x)`` as ``gA = Bᵀ G`` and ``gB = G Aᵀ``. Written as
``m ⊙ gyᵀ x = gyᵀ x − (1 − m) ⊙ gyᵀ x``, they are the low-rank products ``(gy B)ᵀ x`` and
``gyᵀ (x Aᵀ)`` minus the dropped entries' share, which needs ``gyᵀ x`` only where the mask
drops: ``p`` of the dense weight gradient of full fine-tuning
(:func:`~tensadapt.native.drop_factor_grads`, for ``p ≤`` :data:`SPARSE_MAX_P`). Above that
rate, or without the native library, the dense masked gradient is formed.
"""

from __future__ import annotations

import torch

from . import gemm, native
from .low_rank import KEEP_BITS, keep_scale
from .precision import autocast_off

__all__ = ["draw_key", "threshold", "hashed_keep_mask", "DropConnectLinear"]

MASK32 = 0xFFFFFFFF
MIX = (0x7FEB352D, 0x846CA68B)  # the finaliser's two multipliers
MAX_ENTRIES = 2**32  # entries are indexed by 32-bit counters
#: up to this drop rate the factor gradients take the dropped entries' sums (p of the dense
#: product's work, plus thin passes) instead of the dense masked gradient
SPARSE_MAX_P = 0.25


def draw_key() -> torch.Tensor:
    """``(k₀, k₁)``: two uniform 32-bit words from torch's generator, as an int64 tensor (a
    tensor, so that ``torch.compile`` can trace the draw)."""
    return torch.randint(0, 2**32, (2,), dtype=torch.int64)


def _ints(key: torch.Tensor) -> tuple[int, int]:
    k0, k1 = key.tolist()
    return int(k0), int(k1)


def threshold(p: float) -> int:
    """``round(p·2¹⁶)``: an entry keeps when the top 16 bits of its hash reach this value."""
    return round(p * 2**KEEP_BITS)


def _signed32(c: int) -> int:
    """``c`` or ``c − 2³²``, whichever lies in ``[−2³¹, 2³¹)``: the same residue mod 2³²."""
    return c - 2**32 if c >= 2**31 else c


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x·c mod 2³²`` for ``x`` in ``[0, 2³²)`` (int64), in two ops.

    ``c`` is taken as its signed residue ``c′`` (:func:`_signed32`), so ``|x·c′| < 2⁶³``: the
    int64 product never overflows, and its two's-complement low 32 bits (``& (2³² − 1)``) are
    ``x·c mod 2³²`` whatever its sign."""
    return (x * _signed32(c)) & MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """The finaliser ``f`` on ``x`` in ``[0, 2³²)`` (int64): ``x ← x ⊕ (x ≫ 16)``,
    ``x ← x·M₀ mod 2³²``, ``x ← x ⊕ (x ≫ 15)``, ``x ← x·M₁ mod 2³²``, ``x ⊕ (x ≫ 16)``."""
    x = x ^ (x >> 16)
    x = _mul32(x, MIX[0])
    x = x ^ (x >> 15)
    x = _mul32(x, MIX[1])
    return x ^ (x >> 16)


def _keep_from_counters(e: torch.Tensor, t: int, key: torch.Tensor) -> torch.Tensor:
    """``(h(e) ≫ 16) ≥ t`` for int64 counters ``e``, in 21 elementwise ops.

    The last step of ``f``, ``x ⊕ (x ≫ 16)``, leaves the top 16 bits of ``x`` as they are, so
    the outer ``f`` stops before it and the test reads ``x ≥ t·2¹⁶`` (``x < 2³²``)."""
    x = _mix(e ^ key[0]) ^ key[1]
    x = x ^ (x >> 16)
    x = _mul32(x, MIX[0])
    x = x ^ (x >> 15)
    x = _mul32(x, MIX[1])
    return x >= t << KEEP_BITS


def hashed_keep_mask(
    shape: tuple[int, ...], p: float, key: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """The boolean keep mask of ``key`` over ``shape`` (entries in row-major order)."""
    numel = 1
    for s in shape:
        numel *= s
    if numel > MAX_ENTRIES:
        raise ValueError(
            f"DropConnect masks at most 2**32 entries per matrix; this update has {numel}"
        )
    t = threshold(p)
    if device.type == "cpu" and not native._is_compiling() and native.available():
        return native.keep_bytes(numel, t, _ints(key)).view(torch.bool).view(shape)
    e = torch.arange(numel, dtype=torch.int64, device=device)
    return _keep_from_counters(e, t, key.to(device)).view(shape)


def _native_ok(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        native.usable(w, b, rank=a.shape[0])
        and a.dtype == torch.float32
        and a.device.type == "cpu"
        and a.is_contiguous()
    )


class DropConnectLinear(torch.autograd.Function):
    """``y = x (W + c·(m ⊙ B A))ᵀ + bias`` with a hand-written backward (``W`` frozen).

    Arguments: ``x`` (N, in); ``w`` (out, in) frozen; ``bias`` (out,) or None; ``a`` (R, in);
    ``bm`` (out, R) with the adapter's scale ``s`` in it; ``p`` the drop probability; ``key``
    from :func:`draw_key`. Float32 CPU tensors take the native passes, others PyTorch ops;
    both draw the same mask.

    The PyTorch form (what a GPU runs) draws the mask once, in the forward, and keeps it for
    the backward (one byte per entry of ``W``, beside the four of the saved ``W′``):

    * forward: ``D = B A``, ``W′ = W + c·(m ⊙ D)`` (one ``addcmul``), ``y = x W′ᵀ + bias``;
    * backward: ``gx = gy W′``, ``G = m ⊙ (gyᵀ x)`` (one in-place multiply),
      ``gB = c·G Aᵀ`` and ``gA = c·Bᵀ G`` (``c`` as the products' ``alpha``), ``gbias = 1ᵀ gy``.

    So the mask costs the hash's 22 elementwise ops over ``out × in`` in the forward and one
    multiply in the backward, instead of the hash in both passes.
    """

    @staticmethod
    @autocast_off
    def forward(ctx, x, w, bias, a, bm, p, key):  # noqa: D102
        a = a.contiguous()
        c = keep_scale(p)
        fast = _native_ok(w, a, bm)
        keep = None
        if fast:
            weight = native.drop_fold(w, a, bm, c, threshold(p), _ints(key))
        else:
            keep = hashed_keep_mask(tuple(w.shape), p, key, w.device)
            weight = torch.addcmul(w, bm @ a, keep, value=c)
        out = gemm.linear(x, weight, bias)
        ctx.p, ctx.key, ctx.fast = p, key, fast
        ctx.save_for_backward(x, weight, a, bm, keep)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, gy):  # noqa: D102
        x, weight, a, bm, keep = ctx.saved_tensors
        need_x, _, need_bias, need_a, need_bm, _, _ = ctx.needs_input_grad
        gx = gbias = ga = gbm = None
        if need_x:
            gx = gemm.times(gy, weight)
        p, key = ctx.p, ctx.key
        if (need_a or need_bm) and ctx.fast and sparse_ok(p) and native.usable(gy, x, rank=0):
            # m ⊙ G = G − (1 − m) ⊙ G: thin passes minus the dropped entries' share
            ga, gbm, gbias = native.drop_factor_grads(
                gy, x, a, bm, keep_scale(p), threshold(p), _ints(key), need_bias
            )
            return gx, None, gbias, ga, gbm, None, None
        if need_bias:
            gbias = gy.sum(0)
        if need_a or need_bm:
            c = keep_scale(p)
            g = gy.t() @ x  # (out, in): the dense weight gradient
            if keep is not None:  # the PyTorch form: the forward's mask, c in the products
                g.mul_(keep)
                gbm = torch.addmm(bm, g, a.t(), beta=0, alpha=c) if need_bm else None
                ga = torch.addmm(a, bm.t(), g, beta=0, alpha=c) if need_a else None
                return gx, None, gbias, ga, gbm, None, None
            if g.is_contiguous():
                native.drop_grad_(g, c, threshold(p), _ints(key))
            else:
                g.mul_(hashed_keep_mask(tuple(g.shape), p, key, g.device)).mul_(c)
            if native.usable(g, bm, rank=a.shape[0]):
                gbm, ga = native.grad_pass(g, a.t(), bm)  # G Aᵀ and Bᵀ G in one read of G
            else:
                gbm, ga = g @ a.t(), bm.t() @ g
        return gx, None, gbias, ga, gbm, None, None


def sparse_ok(p: float) -> bool:
    """Whether the factor gradients go through the dropped entries (drop rate at most
    :data:`SPARSE_MAX_P`) rather than the dense masked gradient."""
    return threshold(p) <= SPARSE_MAX_P * 2**KEEP_BITS
