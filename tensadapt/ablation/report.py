"""The report of a study: markdown and CSV tables and a Pareto plot, from ``results.jsonl``.

One row per *cell* — a (task, config, comparison level) over its seeds — with the adapter's
parameter count, accuracy mean ± sample standard deviation over seeds (``statistics.stdev``,
shown for 2+ seeds), and the means over seeds of the median step time, the peak memory and
the wall time. For several tasks an averages table gives both conventions: the **mean over
tasks** (each task counts once) and the **mean of group means** (tasks are averaged within
their group, e.g. image / text, then the groups are averaged). The plot shows accuracy vs
adapter parameters (log x) per task, with the Pareto front; zero-parameter configurations
(head only) are drawn as horizontal reference lines.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .results import read_results

__all__ = [
    "Cell",
    "Average",
    "Report",
    "summarize",
    "average_over_tasks",
    "markdown_report",
    "write_csv",
    "pareto_front",
    "pareto_plot",
    "write_report",
]


@dataclass
class Cell:
    """The runs of one (task, config, level) over seeds."""

    task: str
    task_group: str
    config: str
    condition: str
    level: int | None
    params: float
    seeds: int
    accuracy_mean: float
    accuracy_std: float | None
    step_time_s: float
    peak_memory_mb: float
    wall_time_s: float
    model: str = ""
    dataset: str = ""

    @property
    def setting(self) -> str:
        if self.condition == "isoparameter":
            return f"budget {self.level:,}"
        if self.condition == "isorank":
            return f"rank {self.level}"
        return "as given"


@dataclass
class Average:
    """One config at one level, averaged over tasks."""

    config: str
    condition: str
    level: int | None
    per_task: dict[str, float]
    mean_over_tasks: float | None
    mean_of_group_means: float | None
    groups: dict[str, list[str]] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        return Cell("", "", "", self.condition, self.level, 0, 0, 0, None, 0, 0, 0).setting


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _cell_key(r: Mapping[str, Any]) -> tuple:
    level = r.get("budget") if r.get("condition") == "isoparameter" else r.get("rank")
    return (r["task"], r["config_name"], r.get("condition", "fixed"), level)


def summarize(records: Iterable[Mapping[str, Any]]) -> list[Cell]:
    """One :class:`Cell` per (task, config, condition, level), in first-appearance order of
    tasks, then configs, then levels."""
    records = list(records)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault(_cell_key(r), []).append(r)
    task_order = {t: i for i, t in reversed(list(enumerate(r["task"] for r in records)))}
    config_order = {c: i for i, c in reversed(list(enumerate(r["config_name"] for r in records)))}
    cells = []
    for (task, config, condition, level), rs in groups.items():
        acc = [float(r["accuracy"]) for r in rs]
        cells.append(
            Cell(
                task=task,
                task_group=rs[0].get("task_group", ""),
                config=config,
                condition=condition,
                level=level,
                params=_whole(_mean([float(r["params"]) for r in rs])),
                seeds=len(rs),
                accuracy_mean=_mean(acc),
                accuracy_std=statistics.stdev(acc) if len(acc) > 1 else None,
                step_time_s=_mean([float(r["step_time_s"]) for r in rs]),
                peak_memory_mb=_mean([float(r["peak_memory_mb"]) for r in rs]),
                wall_time_s=_mean([float(r["wall_time_s"]) for r in rs]),
                model=rs[0].get("model", ""),
                dataset=rs[0].get("dataset", ""),
            )
        )
    cells.sort(
        key=lambda c: (
            task_order[c.task],
            config_order[c.config],
            c.condition,
            -1 if c.level is None else c.level,
        )
    )
    return cells


def average_over_tasks(cells: Sequence[Cell]) -> list[Average]:
    """Per (config, level): the mean over tasks and the mean of group means, for configs
    present on every task (None otherwise)."""
    tasks = list(dict.fromkeys(c.task for c in cells))
    group_of = {c.task: c.task_group or c.task for c in cells}
    groups: dict[str, list[str]] = {}
    for t in tasks:
        groups.setdefault(group_of[t], []).append(t)
    by_key: dict[tuple, dict[str, float]] = {}
    for c in cells:
        by_key.setdefault((c.config, c.condition, c.level), {})[c.task] = c.accuracy_mean
    out = []
    for (config, condition, level), per_task in by_key.items():
        complete = all(t in per_task for t in tasks)
        over_tasks = _mean([per_task[t] for t in tasks]) if complete else None
        over_groups = (
            _mean([_mean([per_task[t] for t in members]) for members in groups.values()])
            if complete
            else None
        )
        out.append(Average(config, condition, level, per_task, over_tasks, over_groups, groups))
    return out


# --------------------------------------------------------------------------- text
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _acc(c: Cell) -> str:
    if c.accuracy_std is None:
        return _pct(c.accuracy_mean)
    return f"{_pct(c.accuracy_mean)} ± {_pct(c.accuracy_std)}"


def _params(p: float) -> str:
    return f"{round(p):,}" if float(p).is_integer() else f"{p:,.1f}"


def _table(head: list[str], rows: list[list[str]], align: str) -> list[str]:
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def markdown_report(cells: Sequence[Cell], title: str = "study") -> str:
    """The tables as markdown: one per task, then the averages over tasks (2+ tasks)."""
    lines = [f"# {title}", ""]
    tasks = list(dict.fromkeys(c.task for c in cells))
    for task in tasks:
        rows = [c for c in cells if c.task == task]
        first = rows[0]
        what = f" ({first.model} on {first.dataset})" if first.model else ""
        lines += [f"## {task}{what}", ""]
        head = [
            "config",
            "setting",
            "params",
            "accuracy (%)",
            "seeds",
            "step (s)",
            "peak mem (MB)",
            "wall (s)",
        ]
        body = [
            [
                c.config,
                c.setting,
                _params(c.params),
                _acc(c),
                str(c.seeds),
                f"{c.step_time_s:.3f}",
                f"{c.peak_memory_mb:.0f}",
                f"{c.wall_time_s:.1f}",
            ]
            for c in rows
        ]
        lines += _table(head, body, "llrrrrrr") + [""]
    if len(tasks) > 1:
        averages = average_over_tasks(cells)
        groups = averages[0].groups if averages else {}
        lines += ["## Averages over tasks", ""]
        head = ["config", "setting", *tasks, "mean over tasks", "mean of group means"]
        body = [
            [a.config, a.setting]
            + [_pct(a.per_task.get(t)) for t in tasks]
            + [_pct(a.mean_over_tasks), _pct(a.mean_of_group_means)]
            for a in averages
        ]
        lines += _table(head, body, "ll" + "r" * (len(tasks) + 2)) + [""]
        desc = "; ".join(f"{g}: {', '.join(ts)}" for g, ts in groups.items())
        lines += [
            f"Accuracy means in %. Groups — {desc}. A config missing on some task has no average.",
            "",
        ]
    lines += [
        "accuracy: mean ± sample std over seeds; params: trainable adapter parameters (head "
        "excluded); step: median optimizer-step time; peak mem: RSS high-water mark above the "
        "run's start; step, peak mem and wall: means over seeds.",
        "",
    ]
    return "\n".join(lines)


def write_csv(cells: Sequence[Cell], path: str | Path) -> Path:
    """One row per cell, raw numbers."""
    path = Path(path)
    cols = list(asdict(cells[0]).keys()) if cells else ["task"]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=cols)
        writer.writeheader()
        for c in cells:
            writer.writerow({k: ("" if v is None else v) for k, v in asdict(c).items()})
    return path


def _write_averages_csv(averages: Sequence[Average], tasks: list[str], path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["config", "condition", "level", *tasks, "mean_over_tasks", "mean_of_group_means"]
        )
        for a in averages:
            writer.writerow(
                [a.config, a.condition, "" if a.level is None else a.level]
                + ["" if a.per_task.get(t) is None else a.per_task[t] for t in tasks]
                + ["" if a.mean_over_tasks is None else a.mean_over_tasks]
                + ["" if a.mean_of_group_means is None else a.mean_of_group_means]
            )
    return path


# --------------------------------------------------------------------------- plot
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (fewer-or-equal params and higher
    accuracy), sorted by parameters."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_plot(cells: Sequence[Cell], path: str | Path, title: str = "") -> Path:
    """Accuracy vs adapter parameters (log x), one panel per task, PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c.task for c in cells))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [c for c in cells if c.task == task]
        pts = [c for c in rows if c.params > 0]
        for c in rows:
            if c.params <= 0:
                ax.axhline(100 * c.accuracy_mean, ls="--", color="grey", lw=1)
                ax.annotate(
                    c.config,
                    (0.01, 100 * c.accuracy_mean),
                    xycoords=("axes fraction", "data"),
                    fontsize=8,
                    color="grey",
                    va="bottom",
                )
        stacked: dict[tuple, int] = {}  # labels of (nearly) coincident points are stacked
        for c in pts:
            err = 100 * c.accuracy_std if c.accuracy_std is not None else None
            ax.errorbar(c.params, 100 * c.accuracy_mean, yerr=err, fmt="o", capsize=3)
            label = c.config if c.condition == "fixed" else f"{c.config} ({c.setting})"
            spot = (round(math.log10(c.params), 1), round(100 * c.accuracy_mean, 1))
            k = stacked[spot] = stacked.get(spot, -1) + 1
            ax.annotate(
                label,
                (c.params, 100 * c.accuracy_mean),
                fontsize=7,
                xytext=(4, 4 + 9 * k),
                textcoords="offset points",
            )
        if pts:
            front = [pts[i] for i in pareto_front([(c.params, c.accuracy_mean) for c in pts])]
            ax.plot(
                [c.params for c in front],
                [100 * c.accuracy_mean for c in front],
                "-",
                drawstyle="steps-post",
                color="tab:red",
                lw=1,
                alpha=0.7,
                label="Pareto front",
            )
            ax.set_xscale("log")
            lo, hi = min(c.params for c in pts), max(c.params for c in pts)
            ax.set_xlim(lo / 3, hi * 3)  # at least a decade, so log ticks read well
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("trainable adapter parameters (log)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(task)
        ax.grid(True, which="both", alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- all of it
@dataclass
class Report:
    """The written report: its markdown text and file paths."""

    markdown: str
    cells: list[Cell]
    paths: dict[str, Path]


def write_report(
    results: str | Path | Iterable[Mapping[str, Any]],
    out_dir: str | Path | None = None,
    *,
    title: str | None = None,
    plot: bool = True,
) -> Report:
    """Write ``report.md``, ``summary.csv`` (+ ``averages.csv``) and ``pareto.png``.

    ``results`` is a ``results.jsonl`` path (then ``out_dir`` defaults to its folder) or
    the records themselves.
    """
    if isinstance(results, (str, Path)):
        path = Path(results)
        records = read_results(path)
        out_dir = Path(out_dir) if out_dir is not None else path.parent
        title = title or path.parent.name
    else:
        records = list(results)
        if out_dir is None:
            raise ValueError("out_dir is required when records are given")
        out_dir = Path(out_dir)
    if not records:
        raise ValueError("no results to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = summarize(records)
    text = markdown_report(cells, title or "study")
    paths = {"markdown": out_dir / "report.md", "csv": out_dir / "summary.csv"}
    paths["markdown"].write_text(text, encoding="utf-8")
    write_csv(cells, paths["csv"])
    tasks = list(dict.fromkeys(c.task for c in cells))
    if len(tasks) > 1:
        paths["averages"] = _write_averages_csv(
            average_over_tasks(cells), tasks, out_dir / "averages.csv"
        )
    if plot:
        paths["plot"] = pareto_plot(cells, out_dir / "pareto.png", title=title or "")
    return Report(text, cells, paths)
