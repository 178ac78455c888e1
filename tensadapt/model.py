"""``TensorAdapterModel``: a frozen base model with tensor adapters injected.

``get_adapter_model(model, config)`` validates everything (targets, modes, shapes, head
counts) before it touches the model, then creates one factorised tensor per instance of the
layout, freezes the base, keeps ``modules_to_save`` trainable and wraps each adapted linear
in a :class:`~tensadapt.layers.TensorAdapterLayer`. The model is wrapped, not copied.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .checkpoint import read_checkpoint, write_checkpoint
from .config import TensorAdapterConfig
from .errors import AdapterStateError, CheckpointError, ConfigError
from .layers import AdapterState, TensorAdapterLayer
from .layout import Layout
from .program import ContributionProgram, RoleBias
from .resolve import Resolution, as_config, resolve_targets
from .siblings import sibling_groups
from .step_cache import StepCache

__all__ = ["TensorAdapterModel", "get_adapter_model"]

_HEAD_NAMES = ("head", "classifier", "score")
_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _modules_to_save(model: nn.Module, spec: list[str] | str | None) -> list[str]:
    names = dict(model.named_modules())
    if spec is None:
        return []
    if spec == "auto":
        return [n for n in _HEAD_NAMES if n in names and any(True for _ in names[n].parameters())]
    if isinstance(spec, str):
        spec = [spec]
    missing = [n for n in spec if n not in names]
    if missing:
        heads = [n for n in names if n.split(".")[-1] in _HEAD_NAMES]
        raise ConfigError(
            f"modules_to_save names {missing}, which are not modules of {type(model).__name__}; "
            f"head-like modules here: {heads or 'none'}"
        )
    return list(spec)


def _device_of(module: nn.Module) -> torch.device:
    w = getattr(module, "weight", None)
    return w.device if isinstance(w, torch.Tensor) else torch.device("cpu")


def _open_pass(cache: StepCache, _module: nn.Module, _args: Any) -> None:
    cache.open()


def _close_pass(cache: StepCache, _module: nn.Module, _args: Any, _out: Any) -> None:
    cache.close()


class TensorAdapterModel(nn.Module):
    """The adapted model: forward is the base model's, with adapters in its linear maps."""

    def __init__(
        self,
        base_model: nn.Module,
        config: TensorAdapterConfig,
        resolution: Resolution,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if any(isinstance(m, TensorAdapterLayer) for m in base_model.modules()):
            raise AdapterStateError(
                f"{type(base_model).__name__} already holds tensor adapters; call "
                "merge_and_unload() or use the base model returned by get_base_model()"
            )
        modules_to_save = _modules_to_save(base_model, config.modules_to_save)
        self.base_model = base_model
        self.adapter_config = config
        self.resolution = resolution
        self.modules_to_save = modules_to_save
        self.__dict__["_state"] = AdapterState()
        self.tensor_adapters = nn.ModuleDict()
        self._device = None if device is None else torch.device(device)
        self._build(resolution.layout)
        # factor products shared across modules live for one forward pass of the model
        cache = self._state.step_cache
        self.__dict__["_pass_hooks"] = (
            base_model.register_forward_pre_hook(functools.partial(_open_pass, cache)),
            base_model.register_forward_hook(
                functools.partial(_close_pass, cache), always_call=True
            ),
        )
        self._expose_base_signature()
        self.training = base_model.training

    # ------------------------------------------------------------------ construction
    def _build(self, layout: Layout) -> None:
        modules = dict(self.base_model.named_modules())
        dtype = _DTYPES[self.adapter_config.adapter_dtype]
        first_module = {}
        for c in layout.contributions:
            first_module.setdefault(c.tensor, c.module)
        for key, spec in layout.tensors.items():
            device = self._device or _device_of(modules[first_module[key]])
            self.tensor_adapters[key] = spec.factorization(
                spec.axes,
                spec.shape,
                spec.rank,
                spec.init,
                spec.options,
                dtype=dtype,
                device=device,
            )
        for key, sizes in layout.biases.items():
            gi = int(key[1:].split("_")[0])
            device = self._device or _device_of(
                modules[next(c.module for c in layout.contributions if c.group == gi)]
            )
            self.tensor_adapters[key] = RoleBias(sizes, dtype=dtype, device=device)
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for name in self.modules_to_save:
            for p in modules[name].parameters():
                p.requires_grad_(True)
        by_module: dict[str, list[ContributionProgram]] = {}
        for c in layout.contributions:
            g = layout.groups[c.group]
            program = ContributionProgram(
                c,
                self.tensor_adapters[c.tensor],
                scale=g.effective_scale(),
                strategy=self.adapter_config.strategy,
                dropout=g.dropout,
                dropout_on=g.dropout_on,
                serial=g.composition == "serial",
                bias=self.tensor_adapters[c.bias] if c.bias else None,
            )
            program.to(device=self._device or _device_of(modules[c.module]))
            by_module.setdefault(c.module, []).append(program)
        self.adapted_layers: dict[str, TensorAdapterLayer] = {}
        for name, programs in by_module.items():
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else self.base_model
            layer = TensorAdapterLayer(modules[name], programs, self._state, name)
            layer.train(modules[name].training)  # adapter dropout follows the model's mode
            setattr(parent, child, layer)
            self.adapted_layers[name] = layer
        for group in sibling_groups(self.adapted_layers):
            for layer in group.members:
                layer.siblings = group

    # ------------------------------------------------------------------ forward & access
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    # HF ``Trainer`` finds the label columns in the *class's* forward signature (``find_labels``)
    # and computes no eval loss without them; declare ``labels``, the name every HF task head
    # uses. Each instance's forward carries the base model's exact signature.
    forward.__signature__ = inspect.Signature(
        [
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL),
            inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )

    def _expose_base_signature(self) -> None:
        """Make ``inspect.signature(model.forward)`` the base model's, as HF ``Trainer`` reads
        it to choose dataset columns."""
        base_forward = self.base_model.forward

        @functools.wraps(base_forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self.base_model(*args, **kwargs)

        self.__dict__["forward"] = forward

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "tensor_adapters"):
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (adapters still injected unless unloaded)."""
        return self.base_model

    def _layer(self, name: str) -> TensorAdapterLayer:
        name = name.removeprefix("base_model.")
        if name not in self.adapted_layers:
            import difflib

            close = difflib.get_close_matches(name, list(self.adapted_layers), n=3)
            raise KeyError(
                f"{name!r} is not an adapted module; adapted modules include "
                f"{close or list(self.adapted_layers)[:5]}"
            )
        return self.adapted_layers[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """The dense update ``s·ΔW`` of module ``name`` (as in ``base_model.named_modules()``),
        in ``(out, in)`` layout, scale included."""
        return self._layer(name).delta_weight()

    # ------------------------------------------------------------------ parameters
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor (trainable and fixed) and every ``modules_to_save`` tensor."""
        out = {f"tensor_adapters.{k}": v for k, v in self.tensor_adapters.state_dict().items()}
        modules = dict(self.base_model.named_modules())
        for name in self.modules_to_save:
            for k, v in modules[name].state_dict().items():
                out[f"modules_to_save.{name}.{k}"] = v
        return out

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (total includes the adapters)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print trainable, adapter-only and total parameter counts."""
        trainable, total = self.get_nb_trainable_parameters()
        adapter = sum(p.numel() for p in self.tensor_adapters.parameters() if p.requires_grad)
        print(
            f"trainable params: {trainable:,} || adapter params: {adapter:,} || "
            f"all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    # ------------------------------------------------------------------ lifecycle
    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly the base model."""
        previous = self._state.disabled
        self._state.disabled = True
        try:
            yield
        finally:
            self._state.disabled = previous

    def merge_adapter(self) -> None:
        """Add each ``s·ΔW`` into its frozen weight in place, one module at a time."""
        if any(layer.merged for layer in self.adapted_layers.values()):
            raise AdapterStateError("the adapter is already merged; call unmerge_adapter() first")
        for layer in self.adapted_layers.values():
            layer.merge()

    def unmerge_adapter(self) -> None:
        """Restore the frozen weights changed by :meth:`merge_adapter`."""
        if not any(layer.merged for layer in self.adapted_layers.values()):
            raise AdapterStateError("the adapter is not merged; nothing to unmerge")
        for layer in self.adapted_layers.values():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge, put the plain modules back, and return the base model (base speed)."""
        if not any(layer.merged for layer in self.adapted_layers.values()):
            self.merge_adapter()
        return self.unload()

    def unload(self) -> nn.Module:
        """Remove the adapters without merging; returns the base model."""
        modules = dict(self.base_model.named_modules())
        for name, layer in self.adapted_layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else self.base_model
            setattr(parent, child, layer.base_layer)
        self.adapted_layers = {}
        for hook in self._pass_hooks:
            hook.remove()
        return self.base_model

    # ------------------------------------------------------------------ persistence
    def _fingerprint(self) -> list[list[Any]]:
        return [[r.module, r.role, *r.shape] for r in self.resolution.rows]

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` atomically."""
        meta = {
            "config": self.adapter_config.to_dict(),
            "base_model_class": type(self.base_model).__name__,
            "targets": self._fingerprint(),
            "tensadapt_version": __version__,
        }
        write_checkpoint(directory, meta, self.adapter_state_dict())

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, directory: str | Path, is_trainable: bool = False
    ) -> TensorAdapterModel:
        """Load a saved adapter into ``base_model``; every check runs before it is changed."""
        meta, tensors = read_checkpoint(directory)
        try:
            config = TensorAdapterConfig.from_dict(meta["config"])
        except (KeyError, ConfigError, TypeError) as err:
            raise CheckpointError(f"{directory}: adapter config is invalid: {err}") from None
        resolution = resolve_targets(base_model, config)
        saved = meta.get("targets")
        here = [[r.module, r.role, *r.shape] for r in resolution.rows]
        if saved != here:
            diff = next(((a, b) for a, b in zip(saved or [], here) if a != b), None)
            raise CheckpointError(
                f"{directory} was saved for {meta.get('base_model_class')} with "
                f"{len(saved or [])} targets; this {type(base_model).__name__} resolves to "
                f"{len(here)} (first difference: saved {diff[0] if diff else '-'} vs here "
                f"{diff[1] if diff else '-'}). Load it into the architecture it was trained on"
            )
        expected = _expected_shapes(base_model, config, resolution)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        if missing or unexpected or wrong:
            raise CheckpointError(
                f"{directory}: weights do not match the config: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape "
                f"{[(k, got[k], expected[k]) for k in wrong[:5]]}"
            )
        model = cls(base_model, config, resolution)
        model._load_adapter_tensors(tensors)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
        return model

    def export_peft_lora(self, directory: str | Path, rank: int | None = None) -> dict[str, float]:
        """Write a PEFT LoRA checkpoint (truncated SVD of each ``s·ΔW``); returns the relative
        error per module (0 up to rounding with ``rank=None``)."""
        from .peft_interop import export_peft_lora

        return export_peft_lora(self, directory, rank)

    @classmethod
    def from_peft_lora(cls, base_model: nn.Module, directory: str | Path) -> TensorAdapterModel:
        """Load a PEFT LoRA checkpoint as a tensadapt ``lora`` adapter with identical outputs."""
        from .peft_interop import load_peft_lora

        return load_peft_lora(base_model, directory)

    @torch.no_grad()
    def _load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        current = {
            f"tensor_adapters.{k}": v
            for k, v in self.tensor_adapters.state_dict(keep_vars=True).items()
        }
        modules = dict(self.base_model.named_modules())
        for name in self.modules_to_save:
            for k, v in modules[name].state_dict(keep_vars=True).items():
                current[f"modules_to_save.{name}.{k}"] = v
        for key, value in tensors.items():
            current[key].copy_(value)


def _expected_shapes(
    base_model: nn.Module, config: TensorAdapterConfig, resolution: Resolution
) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, spec in resolution.layout.tensors.items():
        for name, shape in spec.factorization.parameter_shapes(
            spec.axes, spec.shape, spec.rank, spec.options
        ).items():
            out[f"tensor_adapters.{key}.{name}"] = shape
    for key, sizes in resolution.layout.biases.items():
        for role, size in sizes.items():
            out[f"tensor_adapters.{key}.bias_{role}"] = (size,)
    modules = dict(base_model.named_modules())
    for name in _modules_to_save(base_model, config.modules_to_save):
        for k, v in modules[name].state_dict().items():
            out[f"modules_to_save.{name}.{k}"] = tuple(v.shape)
    return out


def get_adapter_model(
    model: nn.Module,
    config: TensorAdapterConfig | Mapping[str, Any],
    device: torch.device | str | None = None,
) -> TensorAdapterModel:
    """Inject the adapter described by ``config`` into ``model`` (validated first).

    Adapter tensors live on each target's device, or on ``device`` if given (e.g. real
    factors for a base model on the meta device).
    """
    config = as_config(config)
    resolution = resolve_targets(model, config)
    return TensorAdapterModel(model, config, resolution, device=device)
