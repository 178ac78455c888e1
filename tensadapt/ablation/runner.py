"""Run a study: every pending (task, config, level, seed) of a spec, one record per run.

Finished runs are found in ``<out>/results.jsonl`` by their ``run_id`` and skipped, so a
study interrupted by a crash or Ctrl-C resumes where it stopped; each record is appended
atomically as soon as its run ends. ``shard=(i, n)`` runs every n-th run of the grid (see
:func:`~tensadapt.ablation.grid.shard_runs`). Under ``torchrun`` every run trains on all
processes (DDP, gloo) and only rank 0 writes.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .distributed import DistContext, init_from_env
from .grid import Run, expand_grid, shard_runs
from .memory import PeakMemory
from .methods import choose_adapter
from .results import append_record, finished_ids, read_results
from .spec import StudySpec, load_spec
from .tasks import build_model, head_name, load_data
from .train import evaluate, fit

__all__ = ["StudyResult", "run_study", "execute_run", "select_runs", "library_versions"]

RESULTS_FILE = "results.jsonl"
ERRORS_FILE = "errors.jsonl"


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on, and the kernels its products ran on:
    ``products`` the adapted maps' dense products (:func:`tensadapt.gemm.backend`), ``native``
    the thin passes' instruction set (:func:`tensadapt.native.isa`, ``"off"`` without them)."""
    from .. import __version__, gemm, native

    out = {
        "tensadapt": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "products": gemm.backend(),
        "native": native.isa() or "off",
    }
    for name in ("timm", "transformers", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover
            out[name] = "missing"
    return out


def _bar_factory(enabled: bool, desc: str, leave: bool = False) -> Callable[[int], Any] | None:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return lambda total: tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True)


def execute_run(
    run: Run,
    ctx: DistContext | None = None,
    *,
    progress: bool = False,
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train and evaluate one run; return its record (nothing is written)."""
    from ..model import get_adapter_model

    ctx = ctx or DistContext()
    t_start = time.perf_counter()
    recipe = run.recipe
    torch.set_num_threads(max(1, recipe.threads // max(1, ctx.local_world)))
    data = load_data(run.task, recipe)
    model = build_model(run.task, data, recipe, run.seed)
    head = model.get_submodule(head_name(run.task))
    head_params = list(head.parameters())
    choice = choose_adapter(run, model)
    torch.manual_seed(run.seed)
    if choice.config is None:
        for p in model.parameters():
            p.requires_grad_(False)
        net = model
    else:
        net = get_adapter_model(model, choice.config)
    for p in head_params:
        p.requires_grad_(True)  # the fresh head always trains
    head_ids = {id(p) for p in head_params}
    adapter = [p for p in net.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": head_params, "lr": recipe.head_lr or recipe.lr}]
    if adapter:
        groups.insert(0, {"params": adapter, "lr": recipe.lr})
    main = progress and ctx.is_main
    with PeakMemory() as mem:
        t_train = time.perf_counter()
        result = fit(
            net,
            groups,
            data,
            recipe,
            run.seed,
            ctx,
            progress=_bar_factory(main, f"train {run.entry.name}"),
            on_step=on_step,
        )
        train_time = time.perf_counter() - t_train
        t_eval = time.perf_counter()
        correct, total = evaluate(
            net, data, recipe, ctx, progress=_bar_factory(main, f"eval  {run.entry.name}")
        )
        eval_time = time.perf_counter() - t_eval
    peak, peak_rss = ctx.all_reduce([mem.peak_mb, mem.peak_rss_mb], op="max")
    step_time = ctx.all_reduce([result.median_step_time], op="max")[0]
    trained = sum(p.numel() for p in adapter)
    return {
        "run_id": run.run_id,
        "cell_id": run.cell_id,
        "task": run.task.name,
        "task_group": run.task.group,
        "model": run.task.model,
        "dataset": run.task.dataset,
        "config_name": run.entry.name,
        "entry": run.entry.to_dict(),
        "adapter_config": None if choice.config is None else choice.config.to_dict(),
        "ranks": choice.ranks,
        "condition": run.condition,
        "budget": run.level if run.condition == "isoparameter" else None,
        "rank": run.level if run.condition == "isorank" else None,
        "seed": run.seed,
        "recipe": recipe.to_dict(),
        "params": choice.params,
        "params_allocated": trained,
        "head_params": sum(p.numel() for p in head_params),
        "budget_rel_error": choice.rel_error,
        "accuracy": correct / total if total else float("nan"),
        "correct": correct,
        "n_test": total,
        "n_train": data.n_train,
        "train_loss": result.train_loss,
        "steps": result.steps,
        "step_time_s": step_time,
        "step_time_stat": "median over optimizer steps (max over processes)",
        "peak_memory_mb": peak,
        "peak_rss_mb": peak_rss,
        "peak_memory_method": mem.method + (" (max over processes)" if ctx.world > 1 else ""),
        "train_time_s": train_time,
        "eval_time_s": eval_time,
        "wall_time_s": time.perf_counter() - t_start,
        "world_size": ctx.world,
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
        "host": platform.node(),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class StudyResult:
    """What :func:`run_study` did."""

    out_dir: Path
    results_path: Path
    grid: list[Run]
    selected: list[Run]
    skipped: list[Run] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[Run, str]] = field(default_factory=list)
    report: Any = None


def select_runs(
    grid: list[Run], shard: tuple[int, int] = (0, 1), only: str | None = None
) -> list[Run]:
    """This shard's runs, optionally only configs (or ``task:config``) matching a glob."""
    runs = shard_runs(grid, *shard)
    if only:
        pats = [p.strip() for p in only.split(",") if p.strip()]
        runs = [
            r
            for r in runs
            if any(
                fnmatch.fnmatchcase(r.entry.name, p)
                or fnmatch.fnmatchcase(f"{r.task.name}:{r.entry.name}", p)
                for p in pats
            )
        ]
    return runs


def run_study(
    spec: StudySpec | str | Path,
    out_dir: str | Path | None = None,
    *,
    shard: tuple[int, int] = (0, 1),
    only: str | None = None,
    progress: bool = True,
    report: bool = True,
    fail_fast: bool = False,
    log: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run every pending run of ``spec`` (a :class:`StudySpec` or a spec file).

    Args:
        out_dir: Folder of ``results.jsonl`` and the report (default: the spec's ``output``,
            else ``results/<spec name>``).
        shard: ``(i, n)``: run the i-th of n disjoint slices of the grid (0-based).
        only: Comma-separated globs over config names (or ``task:config``).
        progress: tqdm bars (rank 0 only).
        report: Write the report of the whole grid when done.
        fail_fast: Re-raise a failing run's error (else log it to ``errors.jsonl``, go on).
    """
    if not isinstance(spec, StudySpec):
        spec = load_spec(spec)
    own_group = not (dist.is_available() and dist.is_initialized())
    ctx = init_from_env()
    try:
        return _run_study(spec, ctx, out_dir, shard, only, progress, report, fail_fast, log)
    finally:
        if own_group and ctx.active:
            dist.destroy_process_group()


def _run_study(
    spec: StudySpec,
    ctx: DistContext,
    out_dir: str | Path | None,
    shard: tuple[int, int],
    only: str | None,
    progress: bool,
    report: bool,
    fail_fast: bool,
    log: Callable[[str], None] | None,
) -> StudyResult:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if not ctx.is_main:
        log = lambda msg: None  # noqa: E731
    out = Path(out_dir or spec.output or Path("results") / spec.name)
    results_path = out / RESULTS_FILE
    grid = expand_grid(spec)
    selected = select_runs(grid, shard, only)
    done: set[str] = set()
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2, default=str) + "\n")
        done = finished_ids(read_results(results_path))
    done = ctx.broadcast(done)
    pending = [r for r in selected if r.run_id not in done]
    study = StudyResult(out, results_path, grid, selected)
    study.skipped = [r for r in selected if r.run_id in done]
    log(
        f"study {spec.name!r}: {len(grid)} runs in the grid, {len(selected)} in this selection"
        f"{f' (shard {shard[0]}/{shard[1]})' if shard[1] > 1 else ''}, "
        f"{len(study.skipped)} already finished, {len(pending)} to run -> {results_path}"
    )
    outer = None
    if progress and ctx.is_main and pending:
        from tqdm.auto import tqdm

        outer = tqdm(total=len(pending), desc="runs", position=0, dynamic_ncols=True)
    try:
        for run in pending:
            if outer is not None:
                outer.set_postfix_str(run.label, refresh=True)
            try:
                record = execute_run(run, ctx, progress=progress)
            except Exception as err:
                if fail_fast or ctx.world > 1:
                    raise
                message = f"{type(err).__name__}: {err}"
                log(f"run {run.label} failed: {message}\n{traceback.format_exc()}")
                error = {"run_id": run.run_id, "label": run.label, "error": message}
                append_record(out / ERRORS_FILE, error | {"traceback": traceback.format_exc()})
                study.failed.append((run, message))
            else:
                if ctx.is_main:
                    append_record(results_path, record)
                study.records.append(record)
                ctx.barrier()
                if outer is None:
                    log(
                        f"done {run.label}: acc={record['accuracy']:.4f} "
                        f"params={record['params']:,} step={record['step_time_s']:.3f}s "
                        f"wall={record['wall_time_s']:.1f}s"
                    )
            if outer is not None:
                outer.update(1)
    finally:
        if outer is not None:
            outer.close()
    if report and ctx.is_main:
        from .report import write_report

        # the report follows the spec's order, whatever order the runs finished in
        position = {r.run_id: i for i, r in enumerate(grid)}
        records = [r for r in read_results(results_path) if r.get("run_id") in position]
        records.sort(key=lambda r: position[r["run_id"]])
        if records:
            study.report = write_report(records, out, title=spec.name)
    return study
