"""``results.jsonl``: one JSON object per finished run, appended atomically.

Each record is written as one line by a single ``os.write`` on an ``O_APPEND`` descriptor
(under an exclusive ``flock``, so shards sharing a file never interleave), then ``fsync``-ed.
A crash therefore leaves either the whole line or nothing; a torn last line (e.g. a full
disk) is skipped when reading and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["append_record", "read_results", "finished_ids"]

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one line of ``path`` (created if missing), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str) + "\n"
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":  # a torn line from an earlier crash
                    data = b"\n" + data
        written = os.write(fd, data)
        if written != len(data):  # pragma: no cover - only on a full disk
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        os.fsync(fd)
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_results(path: str | Path, *, dedupe: bool = True) -> list[dict[str, Any]]:
    """The records of ``path`` in file order (missing file: ``[]``).

    Unparsable lines (a torn write) are skipped with a warning. With ``dedupe`` only the
    first record of each ``run_id`` is kept.
    """
    path = Path(path)
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    bad = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(record, dict):
                bad += 1
                continue
            rid = record.get("run_id")
            if dedupe and rid is not None:
                if rid in seen:
                    continue
                seen.add(rid)
            out.append(record)
    if bad:
        warnings.warn(f"{path}: skipped {bad} unreadable line(s)", stacklevel=2)
    return out


def finished_ids(records: Iterable[Mapping[str, Any]]) -> set[str]:
    """``run_id`` of every record."""
    return {r["run_id"] for r in records if "run_id" in r}
