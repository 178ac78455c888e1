"""LoRA: ``ΔW = B A`` with ``B ∈ R^{out×r}`` (zero at init) and ``A ∈ R^{r×in}``.

Order 2 only: it pairs with the per-layer tensorisation. ``A`` is drawn
kaiming-uniform(a=√5) as in PEFT (uniform on ±1/√in). Parameters: ``r·(in + out)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import ConfigError
from ._ranks import positive_int
from .base import FactorizedTensor, Term, register_factorization

__all__ = ["LoRA"]


@register_factorization("lora")
class LoRA(FactorizedTensor):
    """``T[in, out] = Σ_r A[r, in] B[out, r]`` (names ``lora_A``, ``lora_B`` as in PEFT)."""

    default_zero = "lora_B"
    default_method = "kaiming_uniform"
    max_order = 2

    @classmethod
    def check_axes(cls, axes: Sequence[str]) -> None:
        super().check_axes(axes)
        if sorted(axes) != ["in", "out"]:
            raise ConfigError(f"lora needs exactly the axes 'in' and 'out', got {list(axes)}")

    @classmethod
    def normalize_rank(cls, axes: Sequence[str], rank: object) -> int:
        if isinstance(rank, Mapping):
            raise ConfigError("lora takes one int rank, not a per-mode mapping")
        return positive_int(rank, "lora rank")

    @classmethod
    def terms(cls, axes: Sequence[str], rank: Any, options: Mapping[str, Any]) -> list[Term]:
        return [("lora_A", ("~r", "in")), ("lora_B", ("out", "~r"))]

    @classmethod
    def label_sizes(cls, axes: Sequence[str], rank: Any) -> dict[str, int]:
        return {"~r": rank}
