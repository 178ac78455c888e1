"""Dry run of a study: every selected run with its solved ranks and parameter count.

Models are built on the meta device (no weights are loaded, nothing is trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .grid import Run, expand_grid
from .methods import choose_adapter, meta_model
from .runner import select_runs
from .spec import StudySpec

__all__ = ["PlannedRun", "plan_runs", "format_plan", "num_classes_of"]

_CLASSES = {"mnist5k": 10, "digits": 10, "fashion_mnist": 10, "rotten_tomatoes": 2}


@dataclass
class PlannedRun:
    run: Run
    params: int
    ranks: list[Any]
    rel_error: float | None


def num_classes_of(run: Run) -> int:
    """Number of classes of the run's dataset."""
    task = run.task
    if task.dataset == "synthetic":
        return task.num_classes or (3 if task.kind == "image" else 2)
    return _CLASSES[task.dataset]


def plan_runs(
    spec: StudySpec, *, shard: tuple[int, int] = (0, 1), only: str | None = None
) -> list[PlannedRun]:
    """The selected runs with their adapters' parameter counts."""
    out = []
    models: dict[tuple, Any] = {}
    for run in select_runs(expand_grid(spec), shard, only):
        key = (run.task.name, run.recipe.image_size)
        if key not in models:
            models[key] = meta_model(run, num_classes_of(run))
        choice = choose_adapter(run, models[key])
        out.append(PlannedRun(run, choice.params, choice.ranks, choice.rel_error))
    return out


def format_plan(plan: list[PlannedRun]) -> str:
    """One line per run."""
    lines = [f"{len(plan)} run(s)"]
    for p in plan:
        err = "" if p.rel_error is None else f" ({100 * p.rel_error:+.1f}% of budget)"
        lines.append(f"  {p.run.run_id}  {p.run.label}: params={p.params:,}{err} ranks={p.ranks}")
    return "\n".join(lines)
