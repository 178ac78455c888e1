"""Where converted assets are cached, and how files are written there atomically."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["CACHE_ENV", "atomic_save", "cache_dir"]

CACHE_ENV = "TENSADAPT_CACHE"


def cache_dir() -> Path:
    """Return the cache root: ``$TENSADAPT_CACHE`` if set, else ``~/.cache/tensadapt``.

    The directory is not created here; :func:`atomic_save` creates parents on write.
    """
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tensadapt"


def atomic_save(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Write ``path`` atomically: ``write`` fills a temporary file that then replaces ``path``.

    The temporary file lives in the destination directory, so :func:`os.replace` is an atomic
    rename: readers never see a half-written file, and a failed write leaves no debris.

    Args:
        path: Final destination.
        write: Callable that writes the complete file to the path it is given.

    Returns:
        The destination path.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return dest
