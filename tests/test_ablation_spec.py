"""Study specs: parsing, clear errors naming the bad field, the grid, run identity, shards."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from tensadapt.ablation import (
    SpecError,
    expand_grid,
    load_spec,
    parse_shard,
    parse_spec,
    select_runs,
    shard_runs,
)

HAS_PRESETS = importlib.util.find_spec("tensadapt.presets") is not None

BASE = {
    "name": "t",
    "tasks": [
        {"name": "img", "model": "tiny_vit", "dataset": "synthetic", "n_train": 32, "n_test": 16},
        {"name": "txt", "model": "tiny_bert", "dataset": "synthetic", "n_train": 32, "n_test": 16},
    ],
    "recipe": {"epochs": 1, "lr": "1e-3", "batch": 8, "warmup": 0.1, "threads": 1},
    "seeds": [0, 1, 2],
    "budget": [1000, 3000],
    "configs": [
        {"name": "head", "head_only": True},
        {"name": "lora", "config": {"factorization": "lora", "targets": ["q", "v"]}},
        {"name": "cp", "config": {"factorization": "cp", "modes": ["depth", "qkv"],
                                  "targets": ["q", "k", "v"]}, "recipe": {"lr": 0.01}},
        {"name": "tk-fixed", "solve": False, "rank": 2,
         "config": {"factorization": "tucker", "modes": ["depth"]}},
    ],
}  # fmt: skip


def spec_with(**changes):
    data = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path.split("__")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DROP:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return data


_DROP = object()


def test_parse_valid_spec():
    spec = parse_spec(BASE)
    assert [t.name for t in spec.tasks] == ["img", "txt"]
    assert spec.recipe.lr == 1e-3 and spec.recipe.batch_size == 8  # "1e-3" string, alias
    assert spec.comparison == ("isoparameter",)  # inferred from budget
    assert spec.tasks[0].group == "image" and spec.tasks[1].group == "text"
    cp = spec.configs[2]
    assert spec.recipe_for(spec.tasks[0], cp).lr == 0.01  # per-config override
    assert spec.configs[3].has_free_rank is False


def test_single_task_shorthand_and_files(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "model: tiny_vit\ndataset: digits\nn_train: 50\nconfigs:\n  - {name: h, head_only: true}\n"
    )
    spec = load_spec(tmp_path / "s.yaml")
    assert spec.name == "s" and spec.tasks[0].name == "digits-tiny_vit"
    (tmp_path / "s.toml").write_text(
        'name = "tm"\nseeds = [1, 2]\nbudget = 5000\n'
        '[[tasks]]\nmodel = "tiny_bert"\ndataset = "synthetic"\n'
        '[[configs]]\nname = "cp"\nconfig = { factorization = "cp", modes = ["depth"] }\n'
    )
    spec = load_spec(tmp_path / "s.toml")
    assert spec.name == "tm" and spec.seeds == (1, 2) and spec.budget == (5000,)
    assert spec.configs[0].config["modes"] == ["depth"]


@pytest.mark.parametrize(
    "changes, field, words",
    [
        ({"recipe__lr": -1}, "recipe.lr", "positive number"),
        ({"recipe__scheduler": "step"}, "recipe.scheduler", "cosine"),
        ({"recipe__epoch": 1}, "recipe", "unknown field(s) ['epoch']"),
        ({"recipe__warmup": 2.5}, "recipe.warmup", "fraction"),
        ({"tasks__0__model": "vit_huge"}, "tasks[0].model", "dinov2_s"),
        ({"tasks__1__dataset": "mnist5k"}, "tasks[1].dataset", "takes text data"),
        ({"tasks__0__dataset": _DROP}, "tasks[0].dataset", "is required"),
        ({"tasks__0__n_train": 0}, "tasks[0].n_train", "positive int"),
        ({"tasks__1__name": "img"}, "tasks[1].name", "already used"),
        ({"configs__1__name": "head"}, "configs[1].name", "already used"),
        ({"configs__1__config__factorization": "svd"}, "configs[1].config", "svd"),
        ({"configs__2__config__modes": ["depth", "depth"]}, "configs[2].config", "twice"),
        ({"configs__1__head_only": True}, "configs[1]", "exactly one of"),
        ({"configs__1__lr": 0.1}, "configs[1]", "unknown field(s) ['lr']"),
        ({"configs__2__recipe": {"lr": "fast"}}, "configs[2].recipe.lr", "positive number"),
        ({"seeds": [0, 0]}, "seeds", "duplicates"),
        ({"seeds": ["a"]}, "seeds[0]", "non-negative int"),
        ({"budget": [1000, -5]}, "budget[1]", "positive int"),
        ({"comparison": "isorank"}, "rank", "required when comparison includes 'isorank'"),
        ({"comparison": "isoflop"}, "comparison", "isoparameter"),
        ({"configs": []}, "configs", "non-empty list"),
        ({"tasks": _DROP}, "tasks", "is required"),
        ({"colour": "red"}, "unknown field(s) ['colour']", "valid fields"),
    ],
)
def test_bad_specs_name_the_field(changes, field, words):
    with pytest.raises(SpecError) as info:
        parse_spec(spec_with(**changes))
    message = str(info.value)
    assert message.startswith(field) or field in message.split(":")[0], message
    assert words in message, message


def test_unreadable_files(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("tasks: [\n")
    with pytest.raises(SpecError, match="cannot be parsed"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "x.ini").write_text("")
    with pytest.raises(SpecError, match=r"\.yaml"):
        load_spec(tmp_path / "x.ini")


@pytest.mark.skipif(not HAS_PRESETS, reason="tensadapt.presets is not available yet")
def test_preset_entries():
    from tensadapt import presets

    name = presets.list()[0]
    spec = parse_spec(spec_with(configs__1={"name": "p", "preset": name, "rank": 4}))
    assert spec.configs[1].adapter_config() is not None
    with pytest.raises(SpecError, match=r"configs\[1\]\.preset: unknown preset 'nope'"):
        parse_spec(spec_with(configs__1={"name": "p", "preset": "nope"}))


def test_grid_levels_and_run_ids():
    spec = parse_spec(BASE)
    grid = expand_grid(spec)
    # per task: head (1 level) + lora, cp (2 budgets) + tk-fixed (1 level); x 3 seeds
    assert len(grid) == 2 * (1 + 2 + 2 + 1) * 3
    ids = [r.run_id for r in grid]
    assert len(set(ids)) == len(ids)
    assert [r.run_id for r in expand_grid(parse_spec(BASE))] == ids  # stable
    cells = {r.cell_id for r in grid}
    assert len(cells) == len(grid) // 3  # seeds share a cell
    # changing the recipe changes identities (old rows are not reused)
    changed = expand_grid(parse_spec(spec_with(recipe__epochs=2)))
    assert not set(ids) & {r.run_id for r in changed}
    both = parse_spec(spec_with(comparison=["isoparameter", "isorank"], rank=[2]))
    conds = {(r.entry.name, r.condition, r.level) for r in expand_grid(both)}
    assert ("cp", "isorank", 2) in conds and ("cp", "isoparameter", 3000) in conds
    assert ("head", "fixed", None) in conds and ("head", "isorank", 2) not in conds


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_shards_partition_the_grid(n):
    grid = expand_grid(parse_spec(BASE))
    shards = [shard_runs(grid, i, n) for i in range(n)]
    ids = [r.run_id for s in shards for r in s]
    assert sorted(ids) == sorted(r.run_id for r in grid)  # union == grid, no overlap
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_parse_shard_and_only():
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(SpecError, match="shard"):
            parse_shard(bad)
    grid = expand_grid(parse_spec(BASE))
    only = select_runs(grid, only="cp,txt:head")
    assert {(r.task.name, r.entry.name) for r in only} == {
        ("img", "cp"),
        ("txt", "cp"),
        ("txt", "head"),
    }
