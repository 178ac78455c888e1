"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes are atomic: each file goes to a temporary sibling first and is renamed into place
only when both are complete, so a crash mid-save leaves the previous checkpoint loadable.
Reads validate everything (format version, targets, tensor names and shapes, a truncated
file) before a model is touched.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

__all__ = [
    "FORMAT_VERSION",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "write_checkpoint",
    "read_checkpoint",
    "atomic_write",
]

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _temp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and a rename."""
    path = Path(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_checkpoint(
    directory: str | os.PathLike, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Write both files; neither replaces its old version until both are fully written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_tmp = _temp_path(directory / WEIGHTS_NAME)
    config_tmp = _temp_path(directory / CONFIG_NAME)
    try:
        flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(
            flat,
            str(weights_tmp),
            metadata={"format": "pt", "tensadapt_format": str(FORMAT_VERSION)},
        )
        text = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True)
        with open(config_tmp, "w") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(weights_tmp, directory / WEIGHTS_NAME)
        os.replace(config_tmp, directory / CONFIG_NAME)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a saved adapter, with clear errors for every defect."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointError(
                f"{p} does not exist; an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                "(written by save_pretrained)"
            )
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{config_path} is not valid JSON ({err}); the file is damaged"
        ) from None
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(
            f"{config_path} has no integer format_version; it was not written by tensadapt"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path} has format_version {version}, newer than this tensadapt reads "
            f"(<= {FORMAT_VERSION}); upgrade tensadapt to load it"
        )
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{weights_path} cannot be read ({err}); the file is truncated or corrupted — "
            "save the adapter again"
        ) from None
    return meta, tensors
