"""``resolve_targets``: the dry run — which modules, which tensor, which coordinates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import TensorAdapterConfig
from .errors import ConfigError
from .layout import Layout, plan_layout
from .roles import role_index
from .targets import find_targets

__all__ = ["Resolution", "TargetRow", "resolve_targets", "as_config"]


@dataclass(frozen=True)
class TargetRow:
    """One adapted (module, role)."""

    module: str
    layer: int
    role: str
    shape: tuple[int, int]
    group: int
    tensor: str
    coordinates: dict[str, list[int]]


@dataclass
class Resolution:
    """The plan of an adapter on a model; ``print(resolution)`` shows it as a table."""

    rows: list[TargetRow]
    layout: Layout

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        head = ("module", "layer", "role", "shape", "group", "tensor", "coordinates")
        body = [
            (
                r.module,
                str(r.layer),
                r.role,
                f"{r.shape[0]}x{r.shape[1]}",
                str(r.group),
                r.tensor,
                " ".join(f"{k}={_short(v)}" for k, v in r.coordinates.items()) or "-",
            )
            for r in self.rows
        ]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in (head, *body)]
        lines.append("")
        lines.append("tensors:")
        for spec in self.layout.tensors.values():
            shape = "x".join(map(str, spec.shape))
            lines.append(
                f"  {spec.key}: {spec.factorization.name} axes={list(spec.axes)} shape={shape} "
                f"rank={spec.rank} params={spec.count():,}"
            )
        lines.append(f"total adapter parameters: {self.layout.count():,}")
        return "\n".join(lines)


def _short(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "[" + ",".join(map(str, values)) + "]"


def as_config(config: TensorAdapterConfig | Mapping[str, Any]) -> TensorAdapterConfig:
    """Accept a config or its dict form."""
    if isinstance(config, TensorAdapterConfig):
        return config
    if isinstance(config, Mapping):
        return TensorAdapterConfig.from_dict(config)
    raise ConfigError(f"expected a TensorAdapterConfig or a dict, got {type(config).__name__}")


def resolve_targets(
    model: nn.Module, config: TensorAdapterConfig | Mapping[str, Any]
) -> Resolution:
    """Resolve ``config`` on ``model`` without changing or allocating anything."""
    config = as_config(config)
    targets = find_targets(model, config.target_modules, config.layer_pattern, config.num_heads)
    layout = plan_layout(targets, config)
    rows = [
        TargetRow(
            p.target.module,
            p.target.layer,
            p.target.role,
            p.target.shape,
            p.group,
            p.tensor,
            p.coordinates,
        )
        for p in layout.placements
    ]
    rows.sort(key=lambda r: (r.layer, role_index(r.role), r.module))
    return Resolution(rows, layout)
