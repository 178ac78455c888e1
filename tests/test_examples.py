"""The examples run end to end in their quick mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_minilm_trainer_quick():
    script = "minilm_trainer.py"
    out = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accuracy" in out.stdout


def test_dinov2_accelerate_quick_merged_equals_adapted_and_export_is_lossless():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import dinov2_accelerate
    finally:
        sys.path.pop(0)
    result = dinov2_accelerate.main(["--quick"])
    assert result["merged"] == pytest.approx(result["adapted"], abs=1 / 16)
    assert result["export_error"] < 1e-5
