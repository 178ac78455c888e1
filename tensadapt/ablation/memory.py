"""Peak memory of a run: the resident-set high-water mark above the run's starting RSS.

On Linux the kernel's high-water mark (``VmHWM``) is reset at the start of the run by
writing ``5`` to ``/proc/self/clear_refs``, so the figure is the run's own peak (optimizer
state, gradients, activations, evaluation), not the process lifetime's. Before that, freed
heap memory is handed back to the OS (``gc.collect()`` and glibc's ``malloc_trim(0)``), so
that an earlier run's freed pages do not hide this run's growth. Elsewhere ``ru_maxrss`` is
used; it cannot be reset, so later runs may report 0 (the method is recorded with the figure).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import resource
import sys
from pathlib import Path

__all__ = ["PeakMemory"]

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _trim_heap() -> bool:
    """Return freed heap pages to the OS (glibc only); True if it could."""
    gc.collect()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def _maxrss_kb() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_mb`` (delta) and ``m.method``."""

    def __init__(self) -> None:
        self.method = "ru_maxrss delta (not resettable)"
        self.start_kb = 0
        self.peak_kb = 0

    def __enter__(self) -> PeakMemory:
        trimmed = _trim_heap()
        try:
            _CLEAR.write_text("5")
            self.start_kb = _status_kb("VmRSS") or 0
            if _status_kb("VmHWM") is not None:
                self.method = "RSS high-water mark minus RSS at run start (VmHWM, reset" + (
                    ", heap trimmed)" if trimmed else ")"
                )
        except OSError:
            self.start_kb = _maxrss_kb()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method.startswith("RSS"):
            self.peak_kb = _status_kb("VmHWM") or 0
        else:
            self.peak_kb = _maxrss_kb()

    @property
    def peak_mb(self) -> float:
        """Peak resident memory above the start of the block, in MiB."""
        return max(0, self.peak_kb - self.start_kb) / 1024.0

    @property
    def peak_rss_mb(self) -> float:
        """Absolute peak resident memory of the process during the block, in MiB."""
        return self.peak_kb / 1024.0
