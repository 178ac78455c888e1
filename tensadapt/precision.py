"""Mixed precision: what ``torch.autocast`` asks of an adapted map, and how the engine's own
autograd functions answer it.

Under ``torch.autocast(device_type, dtype=c)`` a frozen ``nn.Linear`` computes
``y = x Wᵀ + b`` in ``c`` (bfloat16 or float16), whatever the dtypes of ``x``, ``W`` and the
adapter's factors. An adapted map does the same, on the same terms:

    y = c(x) c(W)ᵀ + c(b) + c(s·ΔW) applied in c,

where ``c(t)`` is ``t`` cast to ``c``. The factor products (``B``, ``A``, a mix, a shared
bias) are formed in the factors' own dtype (float32 factors keep float32 products), then
cast once at the boundary of the fused kernel; the casts are autograd ops, so float32
factors receive float32 gradients. The update is never added in a different dtype from the
base output it joins, and a half-precision ``W + ΔW`` is never formed (it would round the
update away): the kernels keep the two products apart in half precision.

Every custom :class:`torch.autograd.Function` of the engine runs its forward and backward
with autocast switched off on its device (:func:`autocast_off`): its inputs arrive in one
dtype, cast by the caller, and its products run in that dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

__all__ = ["autocast_dtype", "autocast_off", "cast"]

F = TypeVar("F", bound=Callable[..., Any])


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives a matmul on ``t``'s device, or None where autocast is off
    there (or ``t`` is not floating point)."""
    device = t.device.type
    if not t.is_floating_point() or not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (``t`` itself when it already is; None stays None)."""
    if t is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _device_type(args: tuple) -> str | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None


def autocast_off(fn: F) -> F:
    """Run ``fn`` (an autograd Function's ``forward(ctx, …)`` or ``backward(ctx, …)``) with
    autocast off on the device of its first tensor argument, when it is on there: the
    function's products run in the dtype of the tensors it was given."""

    @functools.wraps(fn)
    def run(ctx, *args):
        device = _device_type(args)
        if device is None or not torch.is_autocast_enabled(device):
            return fn(ctx, *args)
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)

    return run  # type: ignore[return-value]
