"""The grid of a study: one :class:`Run` per (task, config, level, seed), and its shards.

A run's identity (:attr:`Run.run_id`) is a hash of everything that defines it — the task,
the config entry, the comparison level, the seed and the effective recipe — so re-running a
spec skips the runs already in ``results.jsonl``, and editing a recipe or config makes new
runs rather than silently reusing old rows. :attr:`Run.cell_id` is the same hash without
the seed: the runs that the report averages over.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from .spec import ConfigEntry, Recipe, SpecError, StudySpec, TaskSpec

__all__ = ["Run", "expand_grid", "parse_shard", "shard_runs"]


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Run:
    """One training run of a study."""

    task: TaskSpec
    entry: ConfigEntry
    condition: str  # "isoparameter", "isorank" or "fixed"
    level: int | None  # the budget or the rank
    seed: int
    recipe: Recipe

    def _payload(self) -> dict[str, Any]:
        return {
            "task": self.task.to_dict(),
            "entry": self.entry.to_dict(),
            "condition": self.condition,
            "level": self.level,
            "recipe": self.recipe.to_dict(),
        }

    @property
    def cell_id(self) -> str:
        """Identity of the (task, config, level, recipe) cell: the seeds' common key."""
        return _digest(self._payload())

    @property
    def run_id(self) -> str:
        """Identity of this run: results carrying it are not recomputed."""
        return _digest({**self._payload(), "seed": self.seed})

    @property
    def label(self) -> str:
        level = "" if self.level is None else f" {_level_text(self.condition, self.level)}"
        return f"{self.task.name} | {self.entry.name}{level} | seed {self.seed}"


def _level_text(condition: str, level: int) -> str:
    return f"budget={level:,}" if condition == "isoparameter" else f"rank={level}"


def expand_grid(spec: StudySpec) -> list[Run]:
    """Every run of the spec, in a fixed order: task, config, level, seed."""
    runs = []
    for task in spec.tasks:
        for entry in spec.configs:
            recipe = spec.recipe_for(task, entry)
            for condition, level in spec.levels_for(task, entry):
                for seed in spec.seeds:
                    runs.append(Run(task, entry, condition, level, seed, recipe))
    return runs


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0-based ``i``, ``0 <= i < n``) as ``(i, n)``."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise SpecError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise SpecError(f"--shard {text}: need n >= 1 and 0 <= i < n (shards are 0-based)")
    return i, n


def shard_runs(runs: list[Run], index: int, count: int) -> list[Run]:
    """Shard ``index`` of ``count``: every ``count``-th run, so shards are disjoint and their
    union is the grid, with each shard getting a similar mix of tasks and configs."""
    if count < 1 or not 0 <= index < count:
        raise SpecError(f"shard {index}/{count}: need count >= 1 and 0 <= index < count")
    return runs[index::count]
