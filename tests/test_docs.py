"""Every ```python block in README.md and docs/ runs (page by page, in one namespace), unless
the line before it is ``<!-- not-run: <reason> -->``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.S)


def blocks(page: Path) -> list[tuple[str, str]]:
    """``(marker line, code)`` of each python block."""
    return [(m["before"], m["code"]) for m in FENCE.finditer("\n" + page.read_text())]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for marker, code in blocks(page):
        if marker.startswith("<!-- not-run:"):
            reason = marker.removeprefix("<!-- not-run:").removesuffix("-->").strip()
            assert reason, f"{page.name}: a not-run block must give its reason"
            continue
        exec(compile(code, f"{page.name}", "exec"), namespace)  # noqa: S102


def test_there_are_runnable_blocks():
    runnable = [c for p in PAGES for m, c in blocks(p) if not m.startswith("<!-- not-run:")]
    assert len(runnable) >= 4
