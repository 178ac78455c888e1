"""Separate q, k, v maps of one attention (or a gated MLP's gate and up) run as one autograd
node over their shared input.

BERT-style models keep ``query``, ``key`` and ``value`` as three linear modules that read the
same hidden states. Run apart, each adapted module passes over ``x`` for its own
``h = x Aᵀ`` and ``gAᵀ = ghᵀ x``, and autograd adds the three input gradients. A
:class:`SiblingGroup` runs them as one :class:`~tensadapt.shared_input.SharedInputLowRank`
node: one pass over ``x`` for the rank activations of all three (for ``x Aᵀ`` alone when
they share ``A``, as CaRA's do), one for their ``A`` gradients, and the input gradient
accumulated in one buffer. The first member called computes every member's output; the
others return theirs when they are called with the same tensor in the same forward pass of
the model.

A group fuses only after one pass has shown every member called with the identical input
(cross-attention, where ``key`` and ``value`` read the encoder's states, never fuses), and
only inside a forward pass of the model outside inference mode: not in a backward, under
saved-tensor hooks (activation checkpointing) or while compiling (the
:class:`~tensadapt.step_cache.StepCache` window). A member that is merged, or whose call does
not take the folded low-rank form (half precision, dropout, a mix between its factors), makes
the group run its members apart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .low_rank import FOLD_DTYPES
from .shared_input import SharedInputLowRank

if TYPE_CHECKING:  # pragma: no cover
    from .layers import LowRankOperands, TensorAdapterLayer

__all__ = ["SiblingGroup", "sibling_groups"]

#: roles whose separate modules read one input: the attention's q, k and v, and a gated
#: MLP's gate and up (grouped per parent module, so the two sets never mix)
SIBLING_ROLES = frozenset({"q", "k", "v", "gate", "up"})


class SiblingGroup:
    """Adapted linear modules that read one input, fused once a pass has shown they do."""

    def __init__(self, members: list[TensorAdapterLayer]) -> None:
        self.members = members
        self.verified: bool | None = None  # None: not seen yet; False: members read apart

    # ------------------------------------------------------------------ per call
    def forward(self, member: TensorAdapterLayer, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output from the fused map, or None to run it on its own."""
        scratch = member.state.step_cache.scratch()  # None while compiling: checked first
        if scratch is None or self.verified is False:
            return None
        if torch.is_inference_mode_enabled() or x.is_inference():
            return None  # inference tensors keep no version counter to check reads against
        key = id(self)
        if self.verified is None:
            self._observe(scratch.setdefault((key, "seen"), {}), member, x)
            return None
        pending = scratch.get(key)
        if pending is not None and member.module_name in pending:
            x_seen, version, grad, out = pending.pop(member.module_name)
            if x_seen is x and version == x._version and grad == torch.is_grad_enabled():
                return out
            self.verified = False  # read apart after all: stop fusing
            return None
        outputs = self._fused(x)
        if outputs is None:
            return None
        stamp = (x, x._version, torch.is_grad_enabled())
        scratch[key] = {
            m.module_name: (*stamp, out) for m, out in zip(self.members, outputs) if m is not member
        }
        return outputs[self.members.index(member)]

    def _observe(self, seen: dict, member: TensorAdapterLayer, x: torch.Tensor) -> None:
        seen[member.module_name] = x
        if len(seen) == len(self.members):
            first = next(iter(seen.values()))
            self.verified = all(t is first for t in seen.values())

    # ------------------------------------------------------------------ fused map
    def _fused(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """Every member's output ``(…, out_m)`` from one :class:`SharedInputLowRank` node, or
        None unless every member takes the folded low-rank form (float32/float64, no dropout,
        no mix between its factors)."""
        n = x.numel() // x.shape[-1]
        ops: list[LowRankOperands] = []
        for m in self.members:
            if m.merged or m.input_dropout is not None:
                return None
            factors = m._factors_for(x)
            op = None if factors is None else m._low_rank_operands(n, factors)
            if op is None or op.mix is not None or op.k != 1 or op.p != 0.0:
                return None
            if m.weight_out_in().dtype not in FOLD_DTYPES:
                return None
            ops.append(op)
        shared = all(_same_view(op.a, ops[0].a) for op in ops)
        tensors = [m.weight_out_in() for m in self.members]
        tensors += [op.bias for op in ops] + [op.a for op in ops] + [op.b for op in ops]
        outs = SharedInputLowRank.apply(x.reshape(n, x.shape[-1]), shared, *tensors)
        return tuple(out.view(*x.shape[:-1], out.shape[1]) for out in outs)


def _same_view(t: torch.Tensor, u: torch.Tensor) -> bool:
    """Whether two tensors view the same memory the same way (hence hold the same values)."""
    return (
        t is u
        or t.data_ptr() == u.data_ptr()
        and t.shape == u.shape
        and t.stride() == u.stride()
        and t.dtype == u.dtype
        and t._version == u._version
    )


def sibling_groups(layers: dict[str, TensorAdapterLayer]) -> list[SiblingGroup]:
    """Groups of separate q, k, v (or gate, up) modules under one parent with one input
    width, each a plain ``nn.Linear`` with a single role (a fused ``qkv`` needs no group)."""
    by_parent: dict[tuple, list[TensorAdapterLayer]] = {}
    for name, layer in layers.items():
        roles = {r for p in layer.programs for r in p.contribution.roles}
        if layer.conv1d or len(roles) != 1 or not roles <= SIBLING_ROLES:
            continue
        w = layer.weight_out_in()
        key = (name.rpartition(".")[0], w.shape[1], w.dtype, w.device)
        by_parent.setdefault(key, []).append(layer)
    return [SiblingGroup(group) for group in by_parent.values() if len(group) > 1]
