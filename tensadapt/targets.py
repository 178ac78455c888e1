"""Finding the linear maps to adapt: structurally, or from patterns.

Structural resolution looks for the model's stack of transformer blocks (a container whose
children are named ``0, 1, …``) and, inside each block, for the relative paths that the
supported families use for each role: timm ViT/DINOv2 (fused ``attn.qkv``), HF BERT/RoBERTa/
MiniLM, HF ViT/DINOv2 (transformers 4 and 5 names), LLaMA/Qwen/Mistral (GQA) and GPT-2
(``Conv1D``, fused ``c_attn``). Any other model: ``target_modules`` (role -> regex on the
module name; the key ``"qkv"`` marks a fused q/k/v module) plus ``layer_pattern`` and
``num_heads``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

from .errors import TargetResolutionError

__all__ = ["Target", "find_targets", "ROLE_PATHS", "is_conv1d", "linear_shape"]

#: relative paths inside a block, by role (first match wins); tuples of roles mark fused modules
ROLE_PATHS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("q", "k", "v"): ("attn.qkv", "attn.c_attn", "self_attn.qkv_proj", "attention.qkv"),
    ("q",): (
        "attn.q_proj",
        "self_attn.q_proj",
        "attention.q_proj",
        "attention.self.query",
        "attention.attention.query",
        "attn.q",
    ),
    ("k",): (
        "attn.k_proj",
        "self_attn.k_proj",
        "attention.k_proj",
        "attention.self.key",
        "attention.attention.key",
        "attn.k",
    ),
    ("v",): (
        "attn.v_proj",
        "self_attn.v_proj",
        "attention.v_proj",
        "attention.self.value",
        "attention.attention.value",
        "attn.v",
    ),
    ("o",): (
        "attn.proj",
        "attn.c_proj",
        "attn.o_proj",
        "self_attn.o_proj",
        "attention.o_proj",
        "attention.output.dense",
    ),
    ("fc1",): ("mlp.fc1", "intermediate.dense", "mlp.c_fc"),
    ("fc2",): ("mlp.fc2", "output.dense", "mlp.c_proj"),
    ("gate",): ("mlp.gate_proj",),
    ("up",): ("mlp.up_proj",),
    ("down",): ("mlp.down_proj",),
}

_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_head", "n_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")


@dataclass(frozen=True)
class Target:
    """One role of one linear module: ``rows`` ``[row_offset, row_offset + out_features)``."""

    module: str
    layer: int
    role: str
    in_features: int
    out_features: int
    heads: int | None
    row_offset: int = 0
    module_out: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """``(out, in)`` of this role's block of the weight."""
        return (self.out_features, self.in_features)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D``: ``y = x @ weight + bias`` with weight ``(in, out)``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of a linear-like module (seen through an adapter wrapper), or None."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if is_conv1d(module):
        w = module.weight
        return (w.shape[1], w.shape[0])
    return None


def _block_lists(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    found = []
    for name, module in model.named_modules():
        children = list(module.named_children())
        if len(children) >= 1 and all(n.isdigit() for n, _ in children):
            found.append((name, [m for _, m in children]))
    return found


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        module = getattr(module, part, None) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module


def _attr(objs: Iterable[object], names: Iterable[str]) -> int | None:
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def _configs(model: nn.Module) -> list[object]:
    cfg = getattr(model, "config", None)
    out = [cfg] if cfg is not None else []
    text = getattr(cfg, "text_config", None)
    if text is not None:
        out.append(text)
    return out


def _head_counts(
    model: nn.Module, block: nn.Module, num_heads: int | None
) -> tuple[int | None, int | None]:
    attn = [
        m
        for p in ("attn", "self_attn", "attention", "attention.self", "attention.attention")
        if (m := _get(block, p)) is not None
    ]
    heads = num_heads or _attr(attn + _configs(model), _HEAD_ATTRS)
    kv = _attr(attn + _configs(model), _KV_HEAD_ATTRS) or heads
    return heads, kv


def _role_targets(
    name: str,
    module: nn.Module,
    layer: int,
    roles: tuple[str, ...],
    heads: int | None,
    kv_heads: int | None,
) -> list[Target]:
    shape = linear_shape(module)
    if shape is None:
        return []
    out, inp = shape
    if len(roles) == 1:
        h = kv_heads if roles[0] in ("k", "v") else heads
        return [Target(name, layer, roles[0], inp, out, h, 0, out)]
    if out % len(roles):
        raise TargetResolutionError(
            f"fused module {name} has {out} outputs, not divisible into roles {roles}"
        )
    rows = out // len(roles)
    return [Target(name, layer, r, inp, rows, heads, i * rows, out) for i, r in enumerate(roles)]


def _structural(model: nn.Module, num_heads: int | None) -> list[Target]:
    best: list[Target] = []
    for prefix, blocks in _block_lists(model):
        found: list[Target] = []
        for layer, block in enumerate(blocks):
            heads, kv = _head_counts(model, block, num_heads)
            taken: set[str] = set()
            for roles, paths in ROLE_PATHS.items():
                if taken & set(roles):
                    continue
                for path in paths:
                    module = _get(block, path)
                    if module is not None and linear_shape(module) is not None:
                        name = f"{prefix}.{layer}.{path}" if prefix else f"{layer}.{path}"
                        found += _role_targets(name, module, layer, roles, heads, kv)
                        taken.update(roles)
                        break
        if len(found) > len(best):
            best = found
    return best


def _generic(
    model: nn.Module,
    patterns: Mapping[str, str],
    layer_pattern: str | None,
    num_heads: int | None,
) -> list[Target]:
    layer_re = re.compile(layer_pattern or r"(?:^|\.)(\d+)(?:\.|$)")
    compiled = []
    for role, pattern in patterns.items():
        roles = ("q", "k", "v") if role == "qkv" else (role,)
        try:
            compiled.append((roles, re.compile(pattern)))
        except re.error as err:
            raise TargetResolutionError(
                f"target_modules[{role!r}]={pattern!r} is not a regex: {err}"
            ) from None
    found = []
    for name, module in model.named_modules():
        for roles, regex in compiled:
            if regex.fullmatch(name):
                if linear_shape(module) is None:
                    raise TargetResolutionError(
                        f"target_modules pattern {regex.pattern!r} matched {name} "
                        f"({type(module).__name__}), which is not a linear layer"
                    )
                m = layer_re.search(name)
                if m is None:
                    raise TargetResolutionError(
                        f"module {name} has no layer index; layer_pattern {layer_re.pattern!r} "
                        "must match it with one group of digits"
                    )
                heads = num_heads or _attr(_configs(model), _HEAD_ATTRS)
                kv = _attr(_configs(model), _KV_HEAD_ATTRS) or heads
                found += _role_targets(name, module, int(m.group(1)), roles, heads, kv)
                break
    return found


def find_targets(
    model: nn.Module,
    target_modules: Mapping[str, str] | None = None,
    layer_pattern: str | None = None,
    num_heads: int | None = None,
) -> list[Target]:
    """Every adaptable (module, role) of ``model``, in module order (layer, then role rows)."""
    if target_modules:
        found = _generic(model, target_modules, layer_pattern, num_heads)
    else:
        found = _structural(model, num_heads)
    return found
