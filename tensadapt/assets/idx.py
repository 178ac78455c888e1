"""Read unsigned-byte IDX files (the MNIST / Fashion-MNIST format), gzipped or not."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

__all__ = ["read_idx"]

_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Return the uint8 array stored in an IDX file (``.gz`` files are decompressed).

    Raises:
        ValueError: The file is not an unsigned-byte IDX file or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != _UBYTE:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, payload has {len(data) - header} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
