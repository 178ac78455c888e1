"""The report: exact tables from a given results file, both task-averaging conventions."""

from __future__ import annotations

import csv
import json

import pytest

from tensadapt.ablation import pareto_front, summarize, write_report
from tensadapt.cli import main


def rec(task, group, config, seed, acc, params, step, mem, wall, budget=None, cond=None):
    return {
        "run_id": f"{task}-{config}-{budget}-{seed}",
        "task": task,
        "task_group": group,
        "model": "m",
        "dataset": "d",
        "config_name": config,
        "condition": cond or ("isoparameter" if budget else "fixed"),
        "budget": budget,
        "rank": None,
        "seed": seed,
        "params": params,
        "accuracy": acc,
        "step_time_s": step,
        "peak_memory_mb": mem,
        "wall_time_s": wall,
    }


RECORDS = [
    # task a (group img): head 3 seeds, lora 3 seeds at budget 1000
    rec("a", "img", "head", 0, 0.50, 0, 0.10, 10, 1.0),
    rec("a", "img", "head", 1, 0.60, 0, 0.20, 20, 2.0),
    rec("a", "img", "head", 2, 0.70, 0, 0.30, 30, 3.0),
    rec("a", "img", "lora", 0, 0.80, 1000, 0.5, 100, 10.0, budget=1000),
    rec("a", "img", "lora", 1, 0.90, 1000, 0.7, 140, 14.0, budget=1000),
    rec("a", "img", "lora", 2, 0.85, 1000, 0.6, 120, 12.0, budget=1000),
    # task b (group img), task c (group txt): one seed each
    rec("b", "img", "head", 0, 0.40, 0, 0.1, 5, 1.0),
    rec("b", "img", "lora", 0, 0.60, 1200, 0.2, 6, 2.0, budget=1000),
    rec("c", "txt", "head", 0, 0.90, 0, 0.1, 5, 1.0),
    rec("c", "txt", "lora", 0, 0.70, 900, 0.2, 6, 2.0, budget=1000),
    rec("c", "txt", "only-c", 0, 0.75, 50, 0.2, 6, 2.0),
]

EXPECTED = """# demo

## a (m on d)

| config | setting | params | accuracy (%) | seeds | step (s) | peak mem (MB) | wall (s) |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
| head | as given | 0 | 60.00 ± 10.00 | 3 | 0.200 | 20 | 2.0 |
| lora | budget 1,000 | 1,000 | 85.00 ± 5.00 | 3 | 0.600 | 120 | 12.0 |

## b (m on d)

| config | setting | params | accuracy (%) | seeds | step (s) | peak mem (MB) | wall (s) |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
| head | as given | 0 | 40.00 | 1 | 0.100 | 5 | 1.0 |
| lora | budget 1,000 | 1,200 | 60.00 | 1 | 0.200 | 6 | 2.0 |

## c (m on d)

| config | setting | params | accuracy (%) | seeds | step (s) | peak mem (MB) | wall (s) |
| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |
| head | as given | 0 | 90.00 | 1 | 0.100 | 5 | 1.0 |
| lora | budget 1,000 | 900 | 70.00 | 1 | 0.200 | 6 | 2.0 |
| only-c | as given | 50 | 75.00 | 1 | 0.200 | 6 | 2.0 |

## Averages over tasks

| config | setting | a | b | c | mean over tasks | mean of group means |
| --- | --- | ---: | ---: | ---: | ---: | ---: |
| head | as given | 60.00 | 40.00 | 90.00 | 63.33 | 70.00 |
| lora | budget 1,000 | 85.00 | 60.00 | 70.00 | 71.67 | 71.25 |
| only-c | as given | — | — | 75.00 | — | — |

Accuracy means in %. Groups — img: a, b; txt: c. A config missing on some task has no average.

accuracy: mean ± sample std over seeds; params: trainable adapter parameters (head excluded); \
step: median optimizer-step time; peak mem: RSS high-water mark above the run's start; step, \
peak mem and wall: means over seeds.
"""


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "demo" / "results.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def test_markdown_table_is_exact(results):
    report = write_report(results, plot=False)
    assert report.markdown == EXPECTED
    assert (results.parent / "report.md").read_text() == EXPECTED


def test_csv_is_exact(results):
    write_report(results, plot=False)
    rows = list(csv.DictReader(open(results.parent / "summary.csv")))
    assert [(r["task"], r["config"]) for r in rows] == [
        ("a", "head"), ("a", "lora"), ("b", "head"), ("b", "lora"),
        ("c", "head"), ("c", "lora"), ("c", "only-c"),
    ]  # fmt: skip
    a_lora = rows[1]
    assert float(a_lora["accuracy_mean"]) == pytest.approx(0.85)
    assert float(a_lora["accuracy_std"]) == pytest.approx(0.05)
    assert a_lora["seeds"] == "3" and a_lora["level"] == "1000" and rows[2]["accuracy_std"] == ""
    avg = list(csv.DictReader(open(results.parent / "averages.csv")))
    head = avg[0]
    # mean over tasks (60+40+90)/3; mean of group means ((60+40)/2 + 90)/2
    assert float(head["mean_over_tasks"]) == pytest.approx((0.6 + 0.4 + 0.9) / 3)
    assert float(head["mean_of_group_means"]) == pytest.approx(((0.6 + 0.4) / 2 + 0.9) / 2)
    assert avg[2]["mean_over_tasks"] == ""


def test_cli_report_and_plot(results, capsys):
    main(["report", str(results)])
    assert capsys.readouterr().out.strip() == EXPECTED.strip()
    png = results.parent / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_groups_duplicates_and_pareto_front():
    cells = summarize(RECORDS)
    assert len(cells) == 7 and cells[1].accuracy_std == pytest.approx(0.05)
    pts = [(100, 0.5), (200, 0.7), (150, 0.4), (300, 0.65), (50, 0.45), (400, 0.9)]
    assert pareto_front(pts) == [4, 0, 1, 5]
