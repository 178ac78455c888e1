"""Ablation studies: a spec (tasks, recipe, configurations, seeds, budget) -> runs -> report.

>>> from tensadapt import ablation
>>> spec = ablation.load_spec("benchmarks/specs/quick.yaml")
>>> study = ablation.run_study(spec, "results/quick")        # resumable, shardable
>>> ablation.write_report("results/quick/results.jsonl")      # tables + Pareto plot

The command line: ``tensadapt ablate SPEC [--shard i/n] [--out DIR]`` and
``tensadapt report RESULTS.jsonl``.
"""

from .grid import Run, expand_grid, parse_shard, shard_runs
from .methods import AdapterChoice, choose_adapter
from .report import (
    Average,
    Cell,
    Report,
    average_over_tasks,
    markdown_report,
    pareto_front,
    pareto_plot,
    summarize,
    write_report,
)
from .results import append_record, finished_ids, read_results
from .runner import StudyResult, execute_run, run_study, select_runs
from .spec import ConfigEntry, Recipe, SpecError, StudySpec, TaskSpec, load_spec, parse_spec

__all__ = [
    "SpecError",
    "StudySpec",
    "TaskSpec",
    "ConfigEntry",
    "Recipe",
    "load_spec",
    "parse_spec",
    "Run",
    "expand_grid",
    "parse_shard",
    "shard_runs",
    "select_runs",
    "AdapterChoice",
    "choose_adapter",
    "StudyResult",
    "run_study",
    "execute_run",
    "append_record",
    "read_results",
    "finished_ids",
    "Cell",
    "Average",
    "Report",
    "summarize",
    "average_over_tasks",
    "markdown_report",
    "pareto_front",
    "pareto_plot",
    "write_report",
]
