"""The dense products of an adapted map, ``x W'ᵀ + b``, ``g W'`` and ``gᵀ x``, on BLAS or oneDNN.

Once a low-rank update is folded into the frozen weight (``W' = W + B A``), an adapted map's
step holds two token-sized products: the forward's ``y = x W'ᵀ + b`` and the backward's input
gradient ``gx = gy W'``, ``N · in · out`` multiply-adds each. A materialised ``W + ΔW``
(:func:`dense_linear`) adds its weight gradient ``gyᵀ x`` (:func:`token_sum`). They are most
of what the adapted map costs, and the engine forms ``W'`` itself, so it also chooses what
multiplies by it.

* ``"blas"``: ``torch.addmm`` / ``@``, which on x86 CPUs run MKL's sgemm. On AMD CPUs MKL keeps
  to its AVX2 code even where the cores have AVX-512.
* ``"onednn"``: oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, shipped with torch for
  its compiled CPU graphs), which picks its kernels by the instruction sets the CPU has. On a
  two-core AMD Zen 5 host it ran DINOv2-S's ``qkv`` product (2080 × 384 → 1152) in 4.1 ms
  against MKL's 9.0 (450 against 200 GFLOP/s), and ``gyᵀ x`` for it in 6.1 ms against 9.8,
  with the same float32 accuracy (relative error 6·10⁻⁷ against a float64 product; MKL's
  3·10⁻⁷).
* ``"auto"`` (the default): oneDNN where torch reports AVX-512 for the CPU and the op is
  present and agrees with BLAS on a check product; BLAS otherwise.

``TENSADAPT_GEMM`` (``auto``, ``blas`` or ``onednn``) sets the choice at import;
:func:`set_backend` and :func:`use_backend` change it at run time. Only float32 CPU products
with at least :data:`MIN_ROWS` rows, outside graph compilation, go to oneDNN; the rest run on
BLAS whatever the choice. Either way a product agrees with ``torch.addmm`` to float32 rounding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from . import native
from .precision import autocast_off

__all__ = [
    "BACKENDS",
    "MIN_ROWS",
    "backend",
    "set_backend",
    "use_backend",
    "status",
    "linear",
    "times",
    "token_sum",
    "dense_linear",
]

BACKENDS = ("auto", "blas", "onednn")
MIN_ROWS = 64  # below this a oneDNN call's set-up outweighs what it saves
_choice = "auto"  # what was asked for
_active = ""  # "blas" | "onednn": what runs; "" until resolved
_onednn_reason: str | None = None  # None: not checked yet; "" usable; else why not


def _onednn_check() -> str:
    """``""`` when oneDNN's matmul is present, enabled and agrees with BLAS; else why not."""
    global _onednn_reason
    if _onednn_reason is not None:
        return _onednn_reason
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if not torch.backends.mkldnn.is_available() or op is None:
        _onednn_reason = (
            "this torch build has no oneDNN matmul (torch.ops.mkldnn._linear_pointwise)"
        )
        return _onednn_reason
    try:
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(MIN_ROWS, 24, generator=gen), torch.randn(40, 24, generator=gen)
        b = torch.randn(40, generator=gen)
        got = op(x, w, b, "none", [None], "")
        ok = torch.allclose(got, torch.addmm(b, x, w.t()), rtol=1e-4, atol=1e-4)
        _onednn_reason = "" if ok else "oneDNN's matmul disagreed with BLAS on a check product"
    except Exception as err:  # an op whose signature changed, a build without the kernel
        _onednn_reason = f"oneDNN's matmul failed a check product: {err}"
    return _onednn_reason


def _resolve(choice: str) -> str:
    if choice == "blas":
        return "blas"
    reason = _onednn_check()
    if choice == "onednn":
        if reason:
            raise RuntimeError(f"gemm backend 'onednn' unavailable: {reason}")
        return "onednn"
    avx512 = "AVX512" in torch.backends.cpu.get_cpu_capability().upper()
    return "onednn" if avx512 and not reason else "blas"


def backend() -> str:
    """The backend in use: ``"blas"`` or ``"onednn"`` (``"auto"`` resolved for this CPU)."""
    global _active
    if not _active:
        _active = _resolve(_choice)
    return _active


def set_backend(name: str) -> str:
    """Choose the backend (one of :data:`BACKENDS`); returns the one now in use.

    ``"onednn"`` raises RuntimeError, naming the reason, where torch's oneDNN matmul is
    missing or fails its check."""
    global _choice, _active
    if name not in BACKENDS:
        raise ValueError(f"gemm backend: expected one of {list(BACKENDS)}, got {name!r}")
    _active = _resolve(name)
    _choice = name
    return _active


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run a block with backend ``name`` (as :func:`set_backend`), then restore the choice."""
    before = _choice
    try:
        yield set_backend(name)
    finally:
        set_backend(before)


def status() -> str:
    """Which backend runs and why: the choice, and oneDNN's availability on this build."""
    reason = _onednn_check()
    cpu = torch.backends.cpu.get_cpu_capability()
    onednn = "usable" if not reason else reason
    return f"{backend()} (asked: {_choice}; CPU capability {cpu}; oneDNN matmul {onednn})"


def _onednn(*tensors: torch.Tensor) -> bool:
    """Whether a product of these float32 CPU matrices goes to oneDNN."""
    if native._is_compiling() or backend() != "onednn" or not torch.backends.mkldnn.enabled:
        return False
    x = tensors[0]
    if x.dim() != 2 or x.shape[0] < MIN_ROWS or not x.is_contiguous():
        return False
    return all(native.plain_cpu_float32(t) for t in tensors)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x Wᵀ + b`` for ``x`` (N, in), ``W`` (out, in), ``b`` (out,) or None."""
    parts = (x, w) if b is None else (x, w, b)
    if _onednn(*parts):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [None], "")
    return torch.addmm(b, x, w.t()) if b is not None else x @ w.t()


def times(g: torch.Tensor, w: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """``g W + C`` for ``g`` (N, out), ``W`` (out, in) and an optional ``C`` (N, in).

    BLAS accumulates into ``C`` in place (``addmm_``) and returns it; oneDNN returns a new
    tensor, adding ``C`` as it writes each tile. Callers use the returned tensor."""
    parts = (g, w) if acc is None else (g, w, acc)
    if _onednn(*parts):
        op = torch.ops.mkldnn._linear_pointwise
        if acc is None:
            return op(g, w.t(), None, "none", [None], "")
        return op.binary(g, acc, w.t(), None, "add")
    return g @ w if acc is None else acc.addmm_(g, w)


def token_sum(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``gᵀ x`` for ``g`` (N, out) and ``x`` (N, in): a dense weight gradient, a sum over the
    N tokens (oneDNN reads both through transposed views, without copies)."""
    if _onednn(g, x):
        return torch.ops.mkldnn._linear_pointwise(g.t(), x.t(), None, "none", [None], "")
    return g.t() @ x


class _DenseLinear(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` trained (a materialised ``W + ΔW``): ``gx = gy W``,
    ``gW = gyᵀ x`` and ``gb = 1ᵀ gy``, each product through :func:`times` /
    :func:`token_sum`."""

    @staticmethod
    @autocast_off
    def forward(ctx, x, w, b):  # noqa: D102
        ctx.save_for_backward(x, w)
        return linear(x, w, b)

    @staticmethod
    @once_differentiable
    @autocast_off
    def backward(ctx, gy):  # noqa: D102
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        gy = gy.contiguous()
        gx = times(gy, w) if need_x else None
        gw = token_sum(gy, x) if need_w else None
        gb = gy.sum(0) if need_b else None
        return gx, gw, gb


def dense_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, b)`` for any leading shape of ``x``, its products on this module's
    backend. On BLAS, or where oneDNN does not apply, it is ``F.linear`` itself."""
    x2d = x.reshape(-1, x.shape[-1])
    parts = (x2d, w) if b is None else (x2d, w, b)
    if not _onednn(*parts):
        return torch.nn.functional.linear(x, w, b)
    return _DenseLinear.apply(x2d, w, b).view(*x.shape[:-1], w.shape[0])


_env = os.environ.get("TENSADAPT_GEMM", "auto").strip().lower() or "auto"
if _env not in BACKENDS:
    raise ValueError(f"TENSADAPT_GEMM: expected one of {list(BACKENDS)}, got {_env!r}")
_choice = _env
