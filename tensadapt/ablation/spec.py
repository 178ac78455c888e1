"""Study specs: parse and validate a YAML / TOML file into a :class:`StudySpec`.

A spec names the tasks (model + dataset + subsample sizes), the training recipe, the
configurations to compare, the seeds and, optionally, the comparison condition: a parameter
budget (``isoparameter``) and/or a common rank (``isorank``). Every error is a
:class:`SpecError` whose message starts with the path of the bad field
(``configs[2].preset: …``). See ``benchmarks/specs/quick.yaml`` for a commented example.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = [
    "SpecError",
    "Recipe",
    "TaskSpec",
    "ConfigEntry",
    "StudySpec",
    "load_spec",
    "parse_spec",
    "IMAGE_MODELS",
    "TEXT_MODELS",
    "IMAGE_DATASETS",
    "TEXT_DATASETS",
    "COMPARISONS",
]

IMAGE_MODELS = ("dinov2_s", "tiny_vit")
TEXT_MODELS = ("minilm", "tiny_bert")
IMAGE_DATASETS = ("mnist5k", "digits", "fashion_mnist", "synthetic")
TEXT_DATASETS = ("rotten_tomatoes", "synthetic")
SCHEDULERS = ("cosine", "linear", "constant")
COMPARISONS = ("isoparameter", "isorank")


class SpecError(ConfigError):
    """A study spec is invalid; the message starts with the path of the bad field."""


def _fail(path: str, message: str) -> SpecError:
    return SpecError(f"{path}: {message}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pos_int(v: object, path: str, *, allow_none: bool = False, zero: bool = False) -> int | None:
    if v is None and allow_none:
        return None
    if not _is_int(v) or v < (0 if zero else 1):
        kind = "a non-negative" if zero else "a positive"
        raise _fail(path, f"must be {kind} int{' or null' if allow_none else ''}, got {v!r}")
    return v


def _number(v: object, path: str, *, positive: bool = False, allow_none: bool = False) -> Any:
    if v is None and allow_none:
        return None
    if isinstance(v, str):  # YAML reads "1e-3" as a string
        try:
            v = float(v)
        except ValueError:
            pass
    if not _is_num(v) or (positive and v <= 0) or v < 0:
        kind = "a positive number" if positive else "a non-negative number"
        raise _fail(path, f"must be {kind}, got {v!r}")
    return float(v)


def _choice(v: object, choices: tuple[str, ...], path: str) -> str:
    if v not in choices:
        raise _fail(path, f"{v!r} is invalid; valid values: {', '.join(choices)}")
    return v  # type: ignore[return-value]


def _mapping(v: object, path: str) -> dict[str, Any]:
    if not isinstance(v, Mapping):
        raise _fail(path, f"must be a mapping, got {type(v).__name__} {v!r}")
    return dict(v)


def _unknown(data: Mapping[str, Any], valid: tuple[str, ...], path: str) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        where = f"{path}: " if path else ""
        raise SpecError(f"{where}unknown field(s) {unknown}; valid fields: {', '.join(valid)}")


def _int_list(v: object, path: str) -> list[int]:
    values = v if isinstance(v, (list, tuple)) else [v]
    if not values:
        raise _fail(path, "must not be empty")
    for i, x in enumerate(values):
        _pos_int(x, f"{path}[{i}]" if isinstance(v, (list, tuple)) else path)
    if len(set(values)) != len(values):
        raise _fail(path, f"has duplicates: {list(values)}")
    return list(values)


# --------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class Recipe:
    """How every run trains and evaluates (AdamW, optional warmup, then the scheduler)."""

    epochs: int = 1
    lr: float = 1e-3
    #: learning rate of the classifier head (default: ``lr``)
    head_lr: float | None = None
    batch_size: int = 32
    eval_batch_size: int = 64
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    #: warmup: a fraction of the total steps (< 1) or a number of steps (int >= 1)
    warmup: float = 0.0
    #: input side for image models (default: the model's own, 112 for dinov2_s)
    image_size: int | None = None
    max_length: int = 64
    grad_clip: float | None = None
    #: stop after this many optimizer steps (timing runs, tests)
    max_steps: int | None = None
    #: CPU threads per process (divided by the number of local processes under torchrun)
    threads: int = 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))
_RECIPE_ALIASES = {"batch": "batch_size", "eval_batch": "eval_batch_size"}


def _parse_recipe(data: object, path: str, base: Recipe) -> Recipe:
    data = {_RECIPE_ALIASES.get(k, k): v for k, v in _mapping(data, path).items()}
    _unknown(data, RECIPE_FIELDS, path)
    out: dict[str, Any] = {}
    for key, v in data.items():
        p = f"{path}.{key}"
        if key in ("epochs", "batch_size", "eval_batch_size", "max_length", "threads"):
            out[key] = _pos_int(v, p)
        elif key in ("max_steps", "image_size"):
            out[key] = _pos_int(v, p, allow_none=True)
        elif key in ("lr",):
            out[key] = _number(v, p, positive=True)
        elif key in ("head_lr", "grad_clip"):
            out[key] = _number(v, p, positive=True, allow_none=True)
        elif key == "weight_decay":
            out[key] = _number(v, p)
        elif key == "scheduler":
            out[key] = _choice(v, SCHEDULERS, p)
        elif key == "warmup":
            w = _number(v, p)
            if w >= 1 and not float(w).is_integer():
                raise _fail(
                    p, f"must be a fraction in [0, 1) or a whole number of steps, got {v!r}"
                )
            out[key] = w
    return replace(base, **out)


# --------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class TaskSpec:
    """One model on one dataset."""

    name: str
    model: str
    dataset: str
    n_train: int | None = None
    n_test: int | None = None
    #: seed of the train/test split and subsample (fixed across run seeds)
    data_seed: int = 0
    #: tasks are averaged per group for "mean of group means" (default: image / text)
    group: str = ""
    #: number of classes of the synthetic dataset
    num_classes: int | None = None
    #: recipe fields overridden for this task
    recipe: dict[str, Any] = field(default_factory=dict)
    #: budgets / ranks overridden for this task (else the spec's)
    budget: list[int] | None = None
    rank: list[int] | None = None

    @property
    def kind(self) -> str:
        return "image" if self.model in IMAGE_MODELS else "text"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


TASK_FIELDS = tuple(f.name for f in fields(TaskSpec))


def _parse_task(data: object, path: str) -> TaskSpec:
    data = _mapping(data, path)
    _unknown(data, TASK_FIELDS, path)
    for key in ("model", "dataset"):
        if key not in data:
            raise _fail(f"{path}.{key}", "is required")
    model = _choice(data["model"], IMAGE_MODELS + TEXT_MODELS, f"{path}.model")
    kind = "image" if model in IMAGE_MODELS else "text"
    datasets = IMAGE_DATASETS if kind == "image" else TEXT_DATASETS
    dataset = data["dataset"]
    if dataset not in datasets:
        all_ds = sorted(set(IMAGE_DATASETS + TEXT_DATASETS))
        hint = (
            f"model {model!r} takes {kind} data; valid datasets for it: {', '.join(datasets)}"
            if dataset in all_ds
            else f"valid datasets: {', '.join(all_ds)}"
        )
        raise _fail(f"{path}.dataset", f"{dataset!r} is invalid; {hint}")
    name = data.get("name", f"{dataset}-{model}")
    if not isinstance(name, str) or not name:
        raise _fail(f"{path}.name", f"must be a non-empty string, got {name!r}")
    group = data.get("group", kind)
    if not isinstance(group, str) or not group:
        raise _fail(f"{path}.group", f"must be a non-empty string, got {group!r}")
    num_classes = _pos_int(data.get("num_classes"), f"{path}.num_classes", allow_none=True)
    if num_classes is not None and dataset != "synthetic":
        raise _fail(
            f"{path}.num_classes", f"applies to the synthetic dataset only, not {dataset!r}"
        )
    recipe = data.get("recipe", {})
    _parse_recipe(recipe, f"{path}.recipe", Recipe())  # validate
    return TaskSpec(
        name=name,
        model=model,
        dataset=dataset,
        n_train=_pos_int(data.get("n_train"), f"{path}.n_train", allow_none=True),
        n_test=_pos_int(data.get("n_test"), f"{path}.n_test", allow_none=True),
        data_seed=_pos_int(data.get("data_seed", 0), f"{path}.data_seed", zero=True),
        group=group,
        num_classes=num_classes,
        recipe=dict(recipe),
        budget=_int_list(data["budget"], f"{path}.budget") if "budget" in data else None,
        rank=_int_list(data["rank"], f"{path}.rank") if "rank" in data else None,
    )


# --------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class ConfigEntry:
    """One configuration to compare: a preset, an explicit config, or the head alone."""

    name: str
    preset: str | None = None
    config: dict[str, Any] | None = None
    head_only: bool = False
    #: rank given to the preset / overriding the config's (the profile when a budget is solved)
    rank: Any = None
    #: keyword arguments of the preset
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: whether the study's budget / rank applies (False keeps the given ranks)
    solve: bool = True
    #: per-mode rank keys kept fixed when solving (Tucker axes, TT bonds)
    fixed_modes: tuple[str, ...] = ()
    #: recipe fields overridden for this configuration (e.g. its own lr)
    recipe: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return "head_only" if self.head_only else ("preset" if self.preset else "config")

    @property
    def has_free_rank(self) -> bool:
        return not self.head_only and self.solve

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["fixed_modes"] = list(self.fixed_modes)
        return out

    def adapter_config(self) -> Any:
        """The :class:`~tensadapt.TensorAdapterConfig` (None for head-only)."""
        from ..config import TensorAdapterConfig

        if self.head_only:
            return None
        if self.preset is not None:
            presets = _presets()
            if presets is None:
                raise SpecError(
                    f"config {self.name!r}: preset {self.preset!r} needs tensadapt.presets, which "
                    "is not available in this version; give an explicit config: {...} instead"
                )
            kw = dict(self.kwargs)
            if self.rank is not None:
                kw["rank"] = self.rank
            return presets.get(self.preset, **kw)
        data = copy.deepcopy(self.config or {})
        if self.rank is not None:
            data["rank"] = self.rank
        return TensorAdapterConfig.from_dict(data)


ENTRY_FIELDS = ("name", "preset", "config", "head_only", "rank", "solve", "fixed_modes", "recipe")


def _presets() -> Any:
    try:
        from .. import presets
    except ImportError:
        return None
    return presets


def _parse_entry(data: object, path: str) -> ConfigEntry:
    data = _mapping(data, path)
    kinds = [k for k in ("preset", "config", "head_only") if data.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise _fail(
            path,
            "give exactly one of preset: <name>, config: {...} or head_only: true"
            + (f" (got {kinds})" if kinds else ""),
        )
    kind = kinds[0]
    if kind != "preset":
        _unknown(data, ENTRY_FIELDS, path)
    name = data.get("name")
    if name is None:
        name = data["preset"] if kind == "preset" else None
    if not isinstance(name, str) or not name:
        raise _fail(f"{path}.name", f"must be a non-empty string, got {name!r}")
    head_only = data.get("head_only", False)
    if not isinstance(head_only, bool):
        raise _fail(f"{path}.head_only", f"must be true or false, got {head_only!r}")
    solve = data.get("solve", True)
    if not isinstance(solve, bool):
        raise _fail(f"{path}.solve", f"must be true or false, got {solve!r}")
    fixed = data.get("fixed_modes", [])
    if isinstance(fixed, str):
        fixed = [fixed]
    if not isinstance(fixed, (list, tuple)) or not all(isinstance(m, str) for m in fixed):
        raise _fail(f"{path}.fixed_modes", f"must be a list of mode names, got {fixed!r}")
    recipe = data.get("recipe", {})
    _parse_recipe(recipe, f"{path}.recipe", Recipe())
    reserved = set(ENTRY_FIELDS)
    kwargs = {k: v for k, v in data.items() if k not in reserved}
    config = data.get("config")
    if kind == "config":
        config = _mapping(config, f"{path}.config")
    entry = ConfigEntry(
        name=name,
        preset=data.get("preset"),
        config=config,
        head_only=head_only,
        rank=data.get("rank"),
        kwargs=kwargs,
        solve=solve and not head_only,
        fixed_modes=tuple(fixed),
        recipe=dict(recipe),
    )
    _check_entry(entry, path)
    return entry


def _check_entry(entry: ConfigEntry, path: str) -> None:
    """Build the config now so a bad preset name or field fails at parse time."""
    if entry.head_only:
        return
    if entry.preset is not None:
        presets = _presets()
        if presets is None:
            return  # checked when the run is built
        names = list(presets.list())
        if entry.preset not in names:
            raise _fail(
                f"{path}.preset", f"unknown preset {entry.preset!r}; valid: {', '.join(names)}"
            )
        where = f"{path} (preset {entry.preset!r} with {sorted(entry.kwargs)})"
    else:
        where = f"{path}.config"
    try:
        entry.adapter_config()
    except SpecError:
        raise
    except (ConfigError, TypeError, ValueError) as err:
        raise SpecError(f"{where}: {err}") from None


# --------------------------------------------------------------------------- the study
@dataclass(frozen=True)
class StudySpec:
    """A parsed study: every (task, config, level, seed) combination is one run."""

    name: str
    tasks: tuple[TaskSpec, ...]
    configs: tuple[ConfigEntry, ...]
    seeds: tuple[int, ...] = (0,)
    recipe: Recipe = field(default_factory=Recipe)
    comparison: tuple[str, ...] = ()
    budget: tuple[int, ...] = ()
    rank: tuple[int, ...] = ()
    description: str = ""
    #: default output folder (``--out`` overrides it)
    output: str | None = None
    #: where the spec was read from (None when parsed from a mapping)
    source: str | None = None

    def recipe_for(self, task: TaskSpec, entry: ConfigEntry) -> Recipe:
        """The spec's recipe with the task's then the config's overrides."""
        recipe = _parse_recipe(task.recipe, "recipe", self.recipe)
        return _parse_recipe(entry.recipe, "recipe", recipe)

    def levels_for(self, task: TaskSpec, entry: ConfigEntry) -> list[tuple[str, int | None]]:
        """The comparison levels of one (task, config): ``(condition, budget or rank)``."""
        if not entry.has_free_rank or not self.comparison:
            return [("fixed", None)]
        out: list[tuple[str, int | None]] = []
        if "isoparameter" in self.comparison:
            out += [("isoparameter", b) for b in (task.budget or self.budget)]
        if "isorank" in self.comparison:
            out += [("isorank", r) for r in (task.rank or self.rank)]
        return out

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=list))


SPEC_FIELDS = (
    "name",
    "description",
    "tasks",
    "model",
    "dataset",
    "n_train",
    "n_test",
    "configs",
    "seeds",
    "recipe",
    "comparison",
    "budget",
    "rank",
    "output",
)
_SINGLE_TASK = ("model", "dataset", "n_train", "n_test")


def parse_spec(data: object, *, name: str | None = None, source: str | None = None) -> StudySpec:
    """Validate a spec mapping (as read from YAML / TOML) into a :class:`StudySpec`."""
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec must be a mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    _unknown(data, SPEC_FIELDS, "")
    single = {k: data.pop(k) for k in _SINGLE_TASK if k in data}
    if "tasks" in data and single:
        raise SpecError(
            f"give either tasks: [...] or a single task's {sorted(single)} at the top level, "
            "not both"
        )
    if "tasks" not in data:
        if not single:
            raise _fail("tasks", "is required (a list of {model, dataset, n_train, n_test})")
        data["tasks"] = [single]
    raw_tasks = data["tasks"]
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise _fail("tasks", f"must be a non-empty list, got {raw_tasks!r}")
    tasks = tuple(_parse_task(t, f"tasks[{i}]") for i, t in enumerate(raw_tasks))
    _unique([t.name for t in tasks], "tasks", "name")

    raw_configs = data.get("configs")
    if raw_configs is None:
        raise _fail("configs", "is required (a list of {name, preset | config | head_only})")
    if not isinstance(raw_configs, list) or not raw_configs:
        raise _fail("configs", f"must be a non-empty list, got {raw_configs!r}")
    configs = tuple(_parse_entry(c, f"configs[{i}]") for i, c in enumerate(raw_configs))
    _unique([c.name for c in configs], "configs", "name")

    seeds_raw = data.get("seeds", [0])
    if _is_int(seeds_raw):
        seeds_raw = [seeds_raw]
    if not isinstance(seeds_raw, list) or not seeds_raw:
        raise _fail("seeds", f"must be a non-empty list of ints, got {seeds_raw!r}")
    for i, s in enumerate(seeds_raw):
        _pos_int(s, f"seeds[{i}]", zero=True)
    if len(set(seeds_raw)) != len(seeds_raw):
        raise _fail("seeds", f"has duplicates: {seeds_raw}")

    recipe = _parse_recipe(data.get("recipe", {}), "recipe", Recipe())
    budget = tuple(_int_list(data["budget"], "budget")) if "budget" in data else ()
    rank = tuple(_int_list(data["rank"], "rank")) if "rank" in data else ()
    comparison = _parse_comparison(data.get("comparison"), budget, rank, tasks)

    spec_name = data.get("name", name or "study")
    if not isinstance(spec_name, str) or not spec_name:
        raise _fail("name", f"must be a non-empty string, got {spec_name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise _fail("description", f"must be a string, got {description!r}")
    output = data.get("output")
    if output is not None and not isinstance(output, str):
        raise _fail("output", f"must be a folder path, got {output!r}")
    return StudySpec(
        name=spec_name,
        tasks=tasks,
        configs=configs,
        seeds=tuple(seeds_raw),
        recipe=recipe,
        comparison=comparison,
        budget=budget,
        rank=rank,
        description=description.strip(),
        output=output,
        source=source,
    )


def _unique(names: list[str], path: str, key: str) -> None:
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise _fail(f"{path}[{i}].{key}", f"{n!r} is already used by {path}[{seen[n]}]")
        seen[n] = i


def _parse_comparison(
    value: object, budget: tuple[int, ...], rank: tuple[int, ...], tasks: tuple[TaskSpec, ...]
) -> tuple[str, ...]:
    has_budget = bool(budget) or any(t.budget for t in tasks)
    has_rank = bool(rank) or any(t.rank for t in tasks)
    if value is None:
        inferred = []
        if has_budget:
            inferred.append("isoparameter")
        if has_rank:
            inferred.append("isorank")
        return tuple(inferred)
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise _fail("comparison", f"must be one of {COMPARISONS} or a list of them, got {value!r}")
    for i, c in enumerate(items):
        _choice(c, COMPARISONS, "comparison" if isinstance(value, str) else f"comparison[{i}]")
    for cond, field_name, given, per_task in (
        ("isoparameter", "budget", budget, [t.budget for t in tasks]),
        ("isorank", "rank", rank, [t.rank for t in tasks]),
    ):
        if cond in items and not given and not all(per_task):
            raise _fail(
                field_name,
                f"is required when comparison includes {cond!r} (an int or a list of ints, "
                f"at the top level or in every task)",
            )
    return tuple(dict.fromkeys(items))


def load_spec(path: str | Path) -> StudySpec:
    """Read a ``.yaml`` / ``.yml`` / ``.toml`` / ``.json`` spec file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:  # pragma: no cover - pyyaml is a bench dependency
                raise SpecError("reading a YAML spec needs PyYAML: pip install pyyaml") from exc
            data = yaml.safe_load(text)
        elif suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # pragma: no cover - Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise SpecError(f"spec file {path.name!r}: use a .yaml, .yml, .toml or .json file")
    except SpecError:
        raise
    except Exception as err:  # a syntax error of the file format
        raise SpecError(f"spec file {str(path)!r} cannot be parsed: {err}") from None
    return parse_spec(data, name=path.stem, source=str(path))
