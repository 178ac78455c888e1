"""From a config entry and a comparison level to the adapter config a run trains.

``isoparameter``: the entry's free ranks are solved for the budget with
:func:`~tensadapt.rank_solver.solve_ranks`; ``isorank``: every free rank is set to the
level with :func:`~tensadapt.rank_solver.apply_rank`; ``fixed``: the entry as given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from ..budget import count_parameters
from ..config import TensorAdapterConfig
from ..rank_solver import apply_rank, solve_ranks
from .grid import Run

__all__ = ["AdapterChoice", "choose_adapter", "meta_model"]


@dataclass
class AdapterChoice:
    """The adapter of one run (``config`` None: head only) and its exact parameter count."""

    config: TensorAdapterConfig | None
    params: int
    budget: int | None = None

    @property
    def rel_error(self) -> float | None:
        """``(params - budget) / budget`` for isoparameter runs."""
        if not self.budget:
            return None
        return (self.params - self.budget) / self.budget

    @property
    def ranks(self) -> list[Any]:
        if self.config is None:
            return []
        return [g.rank for g in self.config.resolved_groups()]


def choose_adapter(run: Run, model: nn.Module) -> AdapterChoice:
    """The adapter config of ``run`` on ``model`` (only shapes are read)."""
    cfg = run.entry.adapter_config()
    if cfg is None:
        return AdapterChoice(None, 0)
    fixed = run.entry.fixed_modes
    if run.condition == "isoparameter":
        sol = solve_ranks(model, cfg, run.level, fixed_modes=fixed)
        return AdapterChoice(sol.config, sol.params, run.level)
    if run.condition == "isorank":
        sol = apply_rank(model, cfg, run.level, fixed_modes=fixed)
        return AdapterChoice(sol.config, sol.params)
    return AdapterChoice(cfg, count_parameters(model, cfg))


def meta_model(run: Run, num_classes: int) -> nn.Module:
    """The run's base model architecture on the meta device (for dry runs: no weights)."""
    import torch

    from .tasks import _template, image_size

    task = run.task
    if task.model == "dinov2_s":
        import timm

        with torch.device("meta"):
            return timm.create_model(
                "vit_small_patch14_dinov2",
                pretrained=False,
                img_size=image_size(task, run.recipe),
                num_classes=num_classes,
            )
    if task.model == "minilm":
        from transformers import AutoConfig, BertForSequenceClassification

        from ..assets import minilm_path

        cfg = AutoConfig.from_pretrained(str(minilm_path()), num_labels=num_classes)
        with torch.device("meta"):
            return BertForSequenceClassification(cfg)
    size = image_size(task, run.recipe) if task.kind == "image" else None
    return _template(task.model, num_classes, size, None)
