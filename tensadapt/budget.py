"""Exact adapter parameter counts, computed from shapes alone (nothing is allocated)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .config import TensorAdapterConfig
from .resolve import resolve_targets

__all__ = ["count_parameters"]


def count_parameters(model: nn.Module, config: TensorAdapterConfig | Mapping[str, Any]) -> int:
    """Trainable adapter parameters ``config`` would add to ``model`` (heads not included)."""
    return resolve_targets(model, config).layout.count()
