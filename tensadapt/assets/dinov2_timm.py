"""Map a canonical ``Dinov2Model`` state dict to timm's ``vit_small_patch14_dinov2`` layout."""

from __future__ import annotations

import re

import torch

__all__ = ["hf_to_timm", "resample_pos_embed"]

_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}
_QKV = ("query", "key", "value")
_DROPPED = {"embeddings.mask_token"}


def _block_key(rest: str) -> str | None:
    """Translate the part of a layer key after ``encoder.layer.N.``; None for q/k/v parts."""
    if rest.startswith("attention.attention."):
        return None
    module, _, leaf = rest.rpartition(".")
    if rest in _BLOCK:  # parameters named without a module suffix (layer scales)
        return _BLOCK[rest]
    if module not in _BLOCK:
        raise KeyError(f"no timm equivalent for DINOv2 key 'encoder.layer.N.{rest}'")
    return f"{_BLOCK[module]}.{leaf}"


def hf_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the timm state dict (``blocks.N.attn.qkv`` fused as ``[q; k; v]``).

    ``state`` uses canonical hub key names. The position embedding keeps its 518 px grid;
    :func:`resample_pos_embed` adapts it to another image size.
    """
    out: dict[str, torch.Tensor] = {}
    layers: set[int] = set()
    for key, value in state.items():
        if key in _DROPPED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        match = _LAYER.match(key)
        if match is None:
            raise KeyError(f"no timm equivalent for DINOv2 key {key!r}")
        index, rest = int(match.group(1)), match.group(2)
        layers.add(index)
        mapped = _block_key(rest)
        if mapped is not None:
            out[f"blocks.{index}.{mapped}"] = value
    for index in sorted(layers):
        prefix = f"encoder.layer.{index}.attention.attention"
        for leaf in ("weight", "bias"):
            parts = [state[f"{prefix}.{name}.{leaf}"] for name in _QKV]
            out[f"blocks.{index}.attn.qkv.{leaf}"] = torch.cat(parts, dim=0).contiguous()
    return out


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample a ``1 x (1 + g*g) x D`` position embedding to a ``grid x grid`` patch grid.

    Bicubic without antialiasing, as ``Dinov2Model.interpolate_pos_encoding`` does, so a timm
    model at any size matches the HF model (and the ONNX graph) at that size.
    """
    from timm.layers import resample_abs_pos_embed

    old = round((pos_embed.shape[1] - 1) ** 0.5)
    if old == grid:
        return pos_embed
    return resample_abs_pos_embed(
        pos_embed,
        new_size=[grid, grid],
        old_size=[old, old],
        num_prefix_tokens=1,
        interpolation="bicubic",
        antialias=False,
    )
