"""Interoperability with PEFT LoRA checkpoints (served by PEFT, vLLM, diffusers).

**Export**: each adapted module's dense update ``s·ΔW`` (shared biases excluded) becomes a
LoRA pair by truncated SVD, ``s·ΔW ≈ B A`` with ``B = U_r √S_r``, ``A = √S_r V_rᵀ`` and
``lora_alpha = r`` (PEFT scale 1). ``rank=None`` keeps each update's numerical rank (lossless
when the structure allows); an int truncates, and the relative Frobenius error per module is
returned. Fused q/k/v modules export under their own name (``attn.qkv``, ``c_attn``), as PEFT
names them. **Import**: a PEFT LoRA checkpoint becomes a tensadapt ``lora`` adapter with
identical outputs (a fused module's shared ``A`` is copied to each role).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch import nn

from .checkpoint import atomic_write
from .errors import CheckpointError, ConfigError
from .targets import find_targets

if TYPE_CHECKING:
    from .model import TensorAdapterModel

__all__ = ["export_peft_lora", "load_peft_lora"]

PREFIX = "base_model.model."


def _numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    if s.numel() == 0 or s[0] == 0:
        return 1
    tol = s[0] * max(shape) * torch.finfo(torch.float32).eps
    return max(1, int((s > tol).sum()))


def export_peft_lora(
    model: TensorAdapterModel, directory: str | os.PathLike, rank: int | None = None
) -> dict[str, float]:
    """Write a PEFT LoRA checkpoint of ``model``; returns the relative error per module."""
    try:
        from peft import LoraConfig
    except ImportError:  # pragma: no cover - peft is in the dev extra
        raise ConfigError("export_peft_lora needs PEFT: pip install peft") from None
    if model.resolution.layout.biases:
        raise ConfigError(
            "this adapter has shared biases (bias=True, e.g. CaRA), which LoRA cannot hold; "
            "export with merge_and_unload() instead"
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be None or a positive int, got {rank!r}")
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    conv1d = False
    for name, layer in model.adapted_layers.items():
        delta = layer.delta_weight().detach().double().cpu()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = _numerical_rank(s, tuple(delta.shape)) if rank is None else min(rank, s.numel())
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        errors[name] = float((delta - b @ a).norm() / delta.norm().clamp_min(1e-300))
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.float().contiguous()
        ranks[name] = r
        conv1d = conv1d or layer.conv1d
    modules = dict(model.base_model.named_modules())
    for name in model.modules_to_save:
        for key, value in modules[name].state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()
    r_max = max(ranks.values())
    config = LoraConfig(
        r=r_max,
        lora_alpha=r_max,
        target_modules=sorted(ranks),
        fan_in_fan_out=conv1d,
        rank_pattern={k: v for k, v in ranks.items() if v != r_max},
        alpha_pattern={k: v for k, v in ranks.items() if v != r_max},
        modules_to_save=list(model.modules_to_save) or None,
    )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save

    atomic_write(directory / "adapter_model.safetensors", save(tensors, {"format": "pt"}))
    config.save_pretrained(str(directory))
    return errors


def load_peft_lora(base_model: nn.Module, directory: str | os.PathLike) -> TensorAdapterModel:
    """A tensadapt ``lora`` adapter equal to the PEFT LoRA checkpoint in ``directory``."""
    from .config import TensorAdapterConfig
    from .model import TensorAdapterModel
    from .resolve import resolve_targets

    directory = Path(directory)
    try:
        meta = json.loads((directory / "adapter_config.json").read_text())
        weights = load_file(str(directory / "adapter_model.safetensors"))
    except Exception as err:  # any read failure becomes one clear error
        raise CheckpointError(f"{directory} is not a readable PEFT checkpoint: {err}") from None
    if meta.get("peft_type") != "LORA":
        raise CheckpointError(f"{directory} holds a {meta.get('peft_type')} adapter; only LORA")
    if meta.get("use_dora") or meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise CheckpointError("DoRA and per-module rank/alpha patterns cannot be imported yet")
    lora_modules = sorted(
        {k[len(PREFIX) :].rsplit(".lora_", 1)[0] for k in weights if ".lora_A." in k}
    )
    by_module: dict[str, list] = {}
    for t in find_targets(base_model):
        by_module.setdefault(t.module, []).append(t)
    unknown = [m for m in lora_modules if m not in by_module]
    if unknown:
        raise CheckpointError(
            f"PEFT adapts {unknown[:3]}, which are not attention/MLP projections tensadapt "
            "resolves in this model"
        )
    roles = sorted({t.role for m in lora_modules for t in by_module[m]})
    all_of_role = {t.module for ts in by_module.values() for t in ts if t.role in roles}
    if all_of_role != set(lora_modules):
        raise CheckpointError(
            "the PEFT adapter covers only some modules of roles "
            f"{roles}; tensadapt adapts a role in every block"
        )
    r = int(meta["r"])
    alpha = float(meta["lora_alpha"])
    scale = alpha / r**0.5 if meta.get("use_rslora") else alpha / r
    saved = meta.get("modules_to_save") or []
    config = TensorAdapterConfig(
        factorization="lora", rank=r, scale=scale, targets=roles, modules_to_save=list(saved)
    )
    model = TensorAdapterModel(base_model, config, resolve_targets(base_model, config))
    with torch.no_grad():
        for module in lora_modules:
            a = weights[f"{PREFIX}{module}.lora_A.weight"]
            b = weights[f"{PREFIX}{module}.lora_B.weight"]
            for t in by_module[module]:
                tensor = model.tensor_adapters[f"g0_l{t.layer}_{t.role}"]
                tensor.lora_A.copy_(a)
                tensor.lora_B.copy_(b[t.row_offset : t.row_offset + t.out_features])
        modules = dict(base_model.named_modules())
        for name in saved:
            for key, value in modules[name].state_dict(keep_vars=True).items():
                value.copy_(weights[f"{PREFIX}{name}.{key}"])
    return model
