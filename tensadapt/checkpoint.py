"""Saving and loading adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Writes are atomic: each file goes to a temporary sibling first and is renamed into place
only when both are complete, so a crash mid-save leaves the previous checkpoint loadable.
Reads validate everything (format version, targets, tensor names and shapes, a truncated
file, and a SHA-256 checksum of the tensors written at save time, which catches flipped
bytes that still parse) before a model is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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
CHECKSUM_KEY = "tensadapt_sha256"


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


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
        checksum = _checksum(flat)
        save_file(
            flat,
            str(weights_tmp),
            metadata={
                "format": "pt",
                "tensadapt_format": str(FORMAT_VERSION),
                CHECKSUM_KEY: checksum,
            },
        )
        # the config names its weights too: a pair from two different saves is refused
        meta = {"format_version": FORMAT_VERSION, **meta, CHECKSUM_KEY: checksum}
        text = json.dumps(meta, indent=2, sort_keys=True)
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
        with safe_open(str(weights_path), framework="pt") as fh:
            saved_sum = (fh.metadata() or {}).get(CHECKSUM_KEY)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"{weights_path} cannot be read ({err}); the file is truncated or corrupted — "
            "save the adapter again"
        ) from None
    if saved_sum is not None and saved_sum != _checksum(tensors):
        raise CheckpointError(
            f"{weights_path} does not match the checksum written when it was saved "
            f"({CHECKSUM_KEY} {saved_sum[:12]}…); the file is truncated or corrupted — "
            "save the adapter again"
        )
    paired = meta.pop(CHECKSUM_KEY, None)
    if paired is not None and saved_sum is not None and paired != saved_sum:
        raise CheckpointError(
            f"{config_path} and {weights_path} come from different saves (the config names "
            f"weights {paired[:12]}…, the file holds {saved_sum[:12]}…); save the adapter again"
        )
    return meta, tensors
