"""The study runner on tiny models: records, resume after a crash / Ctrl-C, shards, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tensadapt.ablation.runner as runner_mod
from tensadapt import cli, gemm, native
from tensadapt.ablation import append_record, expand_grid, parse_spec, read_results, run_study

ROOT = Path(__file__).resolve().parents[1]

SPEC = {
    "name": "tiny",
    "tasks": [
        {"name": "img", "model": "tiny_vit", "dataset": "synthetic", "n_train": 48, "n_test": 24},
        {"name": "txt", "model": "tiny_bert", "dataset": "synthetic", "n_train": 48, "n_test": 24},
    ],
    "recipe": {"epochs": 1, "lr": 0.003, "batch_size": 16, "threads": 1},
    "seeds": [0, 1],
    "budget": 1500,
    "configs": [
        {"name": "head", "head_only": True},
        {"name": "cp", "config": {"factorization": "cp", "modes": ["depth", "qkv"],
                                  "targets": ["q", "k", "v"]}},
        {"name": "tt", "config": {"factorization": "tt", "modes": ["depth*qkv*slices"],
                                  "targets": ["all"], "orientation": "residual"}},
    ],
}  # fmt: skip


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@pytest.fixture
def counted(monkeypatch):
    """Count (and optionally interrupt) the runs that really train."""
    calls: list[str] = []
    real = runner_mod.execute_run
    state = {"interrupt_after": None}

    def execute(run, *args, **kwargs):
        if state["interrupt_after"] is not None and len(calls) == state["interrupt_after"]:
            raise KeyboardInterrupt
        calls.append(run.run_id)
        return real(run, *args, **kwargs)

    monkeypatch.setattr(runner_mod, "execute_run", execute)
    return calls, state


def test_study_records_and_report(tmp_path, counted):
    calls, _ = counted
    spec = parse_spec(SPEC)
    study = run_study(spec, tmp_path, progress=False)
    grid = expand_grid(spec)
    rows = lines(tmp_path / "results.jsonl")
    assert len(rows) == len(grid) == len(calls) == 2 * 3 * 2
    assert {r["run_id"] for r in rows} == {r.run_id for r in grid}
    r = next(x for x in rows if x["config_name"] == "cp" and x["task"] == "img")
    for key in ("accuracy", "params", "step_time_s", "peak_memory_mb", "wall_time_s",
                "adapter_config", "seed", "versions", "peak_memory_method", "ranks"):  # fmt: skip
        assert key in r, key
    assert r["params"] == r["params_allocated"] > 0  # solved count == what was trained
    assert abs(r["params"] - 1500) <= 150 and r["budget"] == 1500
    assert set(r["versions"]) >= {"torch", "timm", "transformers", "tensadapt"}
    assert r["versions"]["products"] == gemm.backend()
    assert r["versions"]["native"] == (native.isa() or "off")
    assert 0.0 <= r["accuracy"] <= 1.0 and r["steps"] == 3
    head = next(x for x in rows if x["config_name"] == "head")
    assert head["params"] == 0 and head["adapter_config"] is None and head["budget"] is None
    assert (tmp_path / "report.md").read_text() == study.report.markdown
    for name in ("summary.csv", "averages.csv", "pareto.png", "spec.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "mean of group means" in study.report.markdown
    # a re-run trains nothing and adds nothing
    calls.clear()
    again = run_study(spec, tmp_path, progress=False)
    assert calls == [] and len(again.skipped) == len(grid)
    assert len(lines(tmp_path / "results.jsonl")) == len(grid)
    # runs re-done out of order (appended last): the report keeps the spec's order
    path = tmp_path / "results.jsonl"
    path.write_text("".join(reversed(path.read_text().splitlines(keepends=True))))
    assert run_study(spec, tmp_path, progress=False).report.markdown == study.report.markdown


def test_same_seed_same_result(tmp_path):
    spec = parse_spec({**SPEC, "tasks": SPEC["tasks"][:1], "configs": SPEC["configs"][1:2]})
    run = expand_grid(spec)[0]
    a = runner_mod.execute_run(run)
    b = runner_mod.execute_run(run)
    assert a["accuracy"] == b["accuracy"] and a["train_loss"] == b["train_loss"]


def test_ctrl_c_then_resume(tmp_path, counted):
    calls, state = counted
    spec = parse_spec(SPEC)
    state["interrupt_after"] = 3
    with pytest.raises(KeyboardInterrupt):
        run_study(spec, tmp_path, progress=False)
    done = lines(tmp_path / "results.jsonl")
    assert len(done) == 3
    state["interrupt_after"] = None
    calls.clear()
    run_study(spec, tmp_path, progress=False, report=False)
    rows = lines(tmp_path / "results.jsonl")
    grid_ids = {r.run_id for r in expand_grid(spec)}
    assert len(calls) == len(grid_ids) - 3  # finished runs were skipped
    assert not {r["run_id"] for r in done} & set(calls)
    assert sorted(r["run_id"] for r in rows) == sorted(grid_ids)  # no duplicates, none lost


def test_killed_process_then_resume(tmp_path, counted):
    """SIGKILL the CLI mid-study; the rerun skips what was written, duplicates nothing."""
    calls, _ = counted
    data = json.loads(json.dumps(SPEC))
    data["tasks"] = data["tasks"][:1]
    data["tasks"][0].update(n_train=480, n_test=240)
    data["recipe"]["epochs"] = 3
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    results = out / "results.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensadapt.cli", "ablate", str(spec_file), "--out", str(out),
         "--no-progress"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_text().count("\n") >= 1:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = lines(results)
    grid = expand_grid(parse_spec(data, name="spec"))
    assert 1 <= len(before) < len(grid), "the kill should land mid-study"
    run_study(spec_file, out, progress=False, report=False)
    rows = lines(results)
    assert len(calls) == len(grid) - len(before)
    assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in grid)


def test_shards_cover_the_grid(tmp_path, counted):
    calls, _ = counted
    spec = parse_spec(SPEC)
    ran = []
    for i in range(3):
        run_study(spec, tmp_path, shard=(i, 3), progress=False, report=False)
        ran.append(list(calls))
        calls.clear()
    assert sorted(x for r in ran for x in r) == sorted(r.run_id for r in expand_grid(spec))
    assert all(ran)
    assert len(read_results(tmp_path / "results.jsonl")) == len(expand_grid(spec))


def test_append_is_line_atomic_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    append_record(path, {"run_id": "a", "x": 1})
    with open(path, "a") as f:
        f.write('{"run_id": "b", "x"')  # a torn write
    append_record(path, {"run_id": "c", "x": 3})
    append_record(path, {"run_id": "a", "x": 9})  # a duplicate id: the first one wins
    with pytest.warns(UserWarning, match="1 unreadable"):
        rows = read_results(path)
    assert [(r["run_id"], r["x"]) for r in rows] == [("a", 1), ("c", 3)]


def test_cli_ablate_dry_run_and_report(tmp_path, capsys):
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(yaml.safe_dump({**SPEC, "tasks": SPEC["tasks"][:1], "seeds": [0]}))
    cli.main(["ablate", str(spec_file), "--dry-run", "--shard", "1/2"])
    out = capsys.readouterr().out
    assert out.startswith("1 run(s)") and "params=" in out
    cli.main(["ablate", str(spec_file), "--out", str(tmp_path / "o"), "--no-progress",
              "--only", "cp"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| cp | budget 1,500 |" in out
    cli.main(["report", str(tmp_path / "o" / "results.jsonl"), "--no-plot"])
    assert "| cp | budget 1,500 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="configs\\[0\\]"):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**SPEC, "configs": [{"name": "x"}]}))
        cli.main(["ablate", str(bad)])
