"""The speed benchmark runs end to end on toy models (so ``make bench`` cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", SPEED)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_quick_mode_on_tiny_models(speed, tmp_path, capsys):
    out = tmp_path / "bench.json"
    results = speed.main(
        ["--tiny", "--repeats", "1", "--warmup", "1", "--no-memory", "--json", str(out)]
        + ["--only", "peft_lora_attn", "ta_lora_attn", "ta_lora_all", "cara", "cara_reference"]
        + ["fact_tt"]
    )
    text = capsys.readouterr().out
    assert "× limit" in text and "## targets" in text
    for fam in ("dinov2", "minilm"):
        timing = results["families"][fam]["timing"]
        assert {"limit", "peft_lora_attn", "ta_lora_attn", "cara", "cara_reference"} <= set(timing)
        assert all(t["median"] > 0 for t in timing.values())
        # no re-planning after the first step at a fixed shape
        assert all(t["plans"]["timed_built"] == 0 for t in timing.values())
        merged = results["families"][fam]["merged"]
        assert set(merged) >= {"base", "ta_lora_all", "cara"}
    assert json.loads(out.read_text())["checks"]


def test_memory_child_reports_every_config(speed, capsys):
    speed.main(["--tiny", "--memory-child", "minilm", "--keys", "limit", "ta_lora_attn"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("MEMORY "))
    memory = json.loads(line[len("MEMORY ") :])
    assert set(memory) == {"limit", "ta_lora_attn"}
    assert all(v >= 0 for v in memory.values())


def test_thin_ops_table_runs(capsys):
    """``benchmarks/thin_ops.py`` prints one row per rank and width, a BLAS time and one per
    instruction set in each cell, and leaves the kernels' set as it found it."""
    from tensadapt import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    path = SPEED.with_name("thin_ops.py")
    spec = importlib.util.spec_from_file_location("bench_thin_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = native.isa()
    module.main(["--ranks", "3", "9", "--widths", "40", "--repeats", "1", "--threads", "1"])
    assert native.isa() == before
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith(("| 3 | 40 |", "| 9 | 40 |"))]
    assert len(rows) == 2
    for row in rows:
        cells = row.strip("|").split("|")[2:]
        assert len(cells) == 4
        assert all(len(cell.split("/")) >= 2 for cell in cells)  # BLAS and at least AVX2


def test_ratio_interval_keeps_rounds_paired(speed):
    """Resampling takes the same rounds for both rows: a row at exactly twice another's
    per-round ratio has the interval [2, 2] however noisy the rounds; unpaired resampling
    would spread it."""
    import random

    rng = random.Random(1)
    b = [rng.uniform(0.8, 1.6) for _ in range(9)]
    a = [2.0 * x for x in b]
    lo, hi = speed.ratio_interval(a, b)
    assert lo == pytest.approx(2.0) and hi == pytest.approx(2.0)
    # one row alone: the interval of its median lies within its range and holds the median
    lo, hi = speed.ratio_interval(b)
    assert min(b) <= lo <= sorted(b)[4] <= hi <= max(b)
    assert lo < hi


def test_summary_tells_resolved_misses_from_noise(speed):
    checks = [
        "[OK  ] a: x / limit = 1.050 [95% interval 1.010-1.090] (target <= 1.1)",
        "[MISS] a: y / limit = 1.120 [95% interval 1.080-1.150] (target <= 1.1)",
        "[MISS] a: z / limit = 1.300 [95% interval 1.260-1.350] (target <= 1.25)",
        "[OK@min] a: w / limit = 1.270 (minima: 1.200) [95% interval 1.230-1.300] (target <= 1.25)",
    ]
    assert speed.summary(checks) == (
        "1 of 4 targets met; 3 missed (1 of them met by the minima), 1 of them with the whole "
        "95% interval above the bound"
    )
    # met only by the minima, with the paired interval wholly above the bound: a resolved miss
    checks = [
        "[OK@min] a: v / PEFT = 0.962 (minima: 0.944) [95% interval 0.951-0.976] (target <= 0.95)"
    ]
    assert speed.summary(checks) == (
        "0 of 1 targets met; 1 missed (1 of them met by the minima), 1 of them with the whole "
        "95% interval above the bound"
    )


def test_rows_report_aten_ops_python_calls_and_both_limits(speed, capsys):
    """Every row carries its aten ops and Python calls per step; the like-for-like limit is
    a row of the same interleaved run, and the report gives ratios against both limits."""
    results = speed.main(
        ["--tiny", "--families", "dinov2", "--repeats", "1", "--warmup", "1", "--no-memory"]
        + ["--no-merged", "--only", "peft_lora_attn", "ta_lora_attn", "cara_preset"]
    )
    text = capsys.readouterr().out
    timing = results["families"]["dinov2"]["timing"]
    assert {"limit", "limit_same", "peft_lora_attn", "ta_lora_attn", "cara_preset"} == set(timing)
    for key, t in timing.items():
        assert t["aten_ops"] > 0 and t["python_calls"] > 0
        # one round: each row once, between two limit steps (the limit: 1 + one per row)
        assert len(t["ratios"]) == (len(timing) if key == "limit" else 1)
    # an adapter adds ops to the frozen step
    assert timing["ta_lora_attn"]["aten_ops"] > timing["limit"]["aten_ops"]
    assert "× like-for-like limit" in text and "aten ops/step" in text
    assert "against 'limit_same'" in text
    assert any("aten ops/step tensadapt LoRA attn / PEFT" in c for c in results["checks"])


def test_bf16_autocast_rows_run(speed):
    results = speed.main(
        ["--tiny", "--families", "minilm", "--repeats", "1", "--warmup", "1", "--no-memory"]
        + ["--no-merged", "--precision", "bf16", "--only", "ta_lora_attn", "cara_preset"]
    )
    timing = results["families"]["minilm"]["timing"]
    assert all(t["median"] > 0 for t in timing.values())


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_cuda_rows_run(speed):
    results = speed.main(
        ["--tiny", "--families", "dinov2", "--repeats", "1", "--warmup", "1", "--device", "cuda"]
        + ["--precision", "bf16", "--only", "ta_lora_attn", "cara_preset"]
    )
    memory = results["families"]["dinov2"]["memory"]
    assert set(memory) >= {"limit", "limit_same", "ta_lora_attn"}


def test_like_for_like_limit_runs_the_adapters_products(speed, monkeypatch):
    """The like-for-like limit computes what the limit computes (same outputs and input
    gradients), with every frozen backbone linear, and not the head, through
    ``tensadapt.gemm.dense_linear``."""
    import torch
    from torch import nn

    import tensadapt as ta

    fam = speed.families(True, 8)["dinov2"]
    calls = []
    real = ta.gemm.dense_linear
    monkeypatch.setattr(ta.gemm, "dense_linear", lambda *a: calls.append(a[1].shape) or real(*a))
    torch.manual_seed(0)
    plain = speed._limit(fam, fam.build())
    torch.manual_seed(0)
    same = speed._limit_same_products(fam, fam.build())
    x = torch.randn(4, 3, 16, 16)
    outs = []
    for model in (plain, same):
        xi = x.clone().requires_grad_()
        out = model(x=xi)
        out.square().sum().backward()
        outs.append((out, xi.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    linears = [m for n, m in same.named_modules() if isinstance(m, nn.Linear) and n != "head"]
    assert len(calls) == len(linears) > 0


def test_dispatch_and_call_counters_count_exactly(speed):
    import torch

    a, b = torch.randn(3, 3), torch.randn(3, 3)
    with speed.AtenOps() as ops:
        (a @ b).add_(1.0).sum()
    assert ops.count == 3  # mm, add_, sum

    def g() -> None:
        pass

    def f() -> None:
        for _ in range(3):
            g()

    assert speed.python_calls(f) == 4  # f and three g


def test_targets_take_the_like_for_like_limit_and_the_paths_bounds(speed):
    """Step-time targets divide by ``limit_same`` where the run has it; the bounds are the
    PyTorch path's or the CPU kernels' ones; aten-op targets are counts."""

    def row(paired: float, ops: int) -> dict:
        return {"paired": paired, "min": paired, "ratios": [paired] * 3, "aten_ops": ops}

    timing = {
        "limit": row(1.0, 1000),
        "limit_same": row(0.8, 1000),
        "peft_lora_all": row(1.3, 2000),
        "ta_lora_all": row(1.1, 2100),
        "cara": row(1.05, 2500),
        "cara_preset": row(1.10, 4300),
    }
    checks = speed.targets_check(timing, None, "f", "kernels")
    cara = next(c for c in checks if c.startswith("[") and "f: CaRA / limit_same" in c)
    assert "= 1.312" in cara and cara.startswith("[MISS") and "target <= 1.1)" in cara
    checks = speed.targets_check(timing, None, "f", "pytorch")
    assert any("cara_preset / limit_same = 1.375" in c and "target <= 1.35" in c for c in checks)
    assert any("[info] f: cara_preset / limit = 1.100" in c for c in checks)
    ops = next(c for c in checks if "aten ops/step CaRA preset" in c)
    assert ops.startswith("[MISS") and "4300 / 2100" in ops
