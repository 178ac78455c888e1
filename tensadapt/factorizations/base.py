"""The factorisation interface and its registry.

A factorisation parameterises a tensor ``T`` of shape ``(n_1, ..., n_N)`` whose axes are
named (``"in"``, ``"out"``, ``"heads"``, ``"depth"``, ``"depth*qkv"``, ...). It is described
by a *network*: a list of ``(parameter name, labels)`` terms whose einsum over shared labels
gives ``T``. Tensor-axis labels are the axis names; rank labels start with ``~``. Every
tensor axis sits on exactly one term, so slicing ``T`` at a coordinate is slicing that term.

Subclasses implement :meth:`normalize_rank`, :meth:`terms`, :meth:`label_sizes` and
``default_zero``; the base class allocates, initialises (one term zero so that ``T = 0``
exactly), counts and reconstructs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..registry import Registry

__all__ = [
    "FactorizedTensor",
    "InitSpec",
    "FACTORIZATIONS",
    "register_factorization",
    "list_factorizations",
    "get_factorization",
    "Rank",
]

Rank = int | Mapping[str, int] | Sequence[int]
Term = tuple[str, tuple[str, ...]]

INIT_METHODS = (
    "zeros",
    "ones",
    "normal",
    "orthogonal",
    "xavier_normal",
    "xavier_uniform",
    "kaiming_uniform",
    "uniform_rank",
)


@dataclass
class InitSpec:
    """How a factorised tensor is initialised.

    ``zero``: the term set to zero (a parameter name, or an axis name meaning the term
    holding that axis); ``method``: the default for the other terms; ``methods``: per
    parameter or axis overrides; ``std``: for ``normal``; ``weights``: CP weights
    (``"ones"`` or ``"normal"`` with ``weights_mean``/``weights_std``).

    The methods, for a term ``t`` of a tensor axis of size ``n`` and rank labels:

    * ``orthogonal``, ``xavier_normal``, ``kaiming_uniform``: on the ``(n, rest)`` matrix
      view of ``t`` (``kaiming_uniform`` is ``U(±1/√n)``, LoRA's A as PEFT draws it);
    * ``xavier_uniform``: ``U(±√(6 / (fan_in + fan_out)))`` with torch's fans of ``t`` in
      its stored shape (``fan_in = t.shape[1]·Π t.shape[2:]``, ``fan_out = t.shape[0]·Π
      t.shape[2:]``), i.e. ``torch.nn.init.xavier_uniform_(t)``;
    * ``uniform_rank``: ``U(±g / √R)`` with ``R`` the size of the term's first rank label
      (the rank the term reads from) and ``g`` its gain in ``gains`` (default 1): for an
      ``(n, R)`` factor, ``g = 1`` is ``kaiming_uniform_(a=√5)`` and ``g = √6`` is
      ``kaiming_uniform_(a=0)`` as torch computes them.

    ``gains``: per parameter or axis, a number, or a list repeated along the term's tensor
    axis (coordinate ``i`` uses ``gains[i mod len]``; a fused block-major axis such as
    ``depth*qkv*slices`` has one period per block). ``seed``: when set, the tensor is drawn
    from a generator seeded with it, so every tensor with the same spec gets the same draws
    (the identical per-tensor seeding of some reference code); the global generator's state
    is left as it was.
    """

    zero: str | None = None
    method: str | None = None
    methods: dict[str, str] = field(default_factory=dict)
    std: float = 1.0
    weights: str = "ones"
    weights_mean: float = 1.0
    weights_std: float = 0.0
    gains: dict[str, float | list[float]] = field(default_factory=dict)
    seed: int | None = None

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | InitSpec | None) -> InitSpec:
        """``None`` (defaults), a zero-term name, a mapping of the fields, or an InitSpec."""
        if spec is None:
            return cls()
        if isinstance(spec, InitSpec):
            return spec
        if isinstance(spec, str):
            return cls(zero=spec)
        if not isinstance(spec, Mapping):
            raise ConfigError(f"init must be None, a term name or a mapping, got {spec!r}")
        unknown = set(spec) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"unknown init keys {sorted(unknown)}; valid keys: "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        out = cls(**dict(spec))
        for method in [out.method or "zeros", *out.methods.values()]:
            if method not in INIT_METHODS:
                raise ConfigError(
                    f"unknown init method {method!r}; valid: {', '.join(INIT_METHODS)}"
                )
        for key, gain in out.gains.items():
            values = gain if isinstance(gain, (list, tuple)) else [gain]
            if not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values
            ):
                raise ConfigError(
                    f"init gains[{key!r}] must be a number ≥ 0 or a non-empty list of them, "
                    f"got {gain!r}"
                )
        if out.seed is not None and (isinstance(out.seed, bool) or not isinstance(out.seed, int)):
            raise ConfigError(f"init seed must be an int or None, got {out.seed!r}")
        if out.weights not in ("ones", "normal"):
            raise ConfigError(f"init weights must be 'ones' or 'normal', got {out.weights!r}")
        return out


class FactorizedTensor(nn.Module):
    """A tensor with named axes, stored as the terms of a factor network."""

    name: ClassVar[str] = ""
    #: the term that starts at zero unless ``init.zero`` says otherwise (an axis or term name)
    default_zero: ClassVar[str] = "out"
    #: how the other terms are drawn unless ``init.method`` says otherwise
    default_method: ClassVar[str] = "orthogonal"
    #: factorisation-specific options and their allowed values (first one is the default)
    option_choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    #: whether the factorisation admits axes beyond ``in``/``out``
    max_order: ClassVar[int | None] = None

    # ----------------------------------------------------------------- static structure
    @classmethod
    def normalize_rank(cls, axes: Sequence[str], rank: Rank) -> Any:
        """Validate ``rank`` for these axes; return the canonical form used by :meth:`terms`."""
        raise NotImplementedError

    @classmethod
    def terms(cls, axes: Sequence[str], rank: Any, options: Mapping[str, Any]) -> list[Term]:
        """The network: ``(parameter name, labels)``; labels are axis names or ``~`` ranks."""
        raise NotImplementedError

    @classmethod
    def label_sizes(cls, axes: Sequence[str], rank: Any) -> dict[str, int]:
        """Sizes of the rank labels."""
        raise NotImplementedError

    @classmethod
    def fixed_terms(cls, options: Mapping[str, Any]) -> set[str]:
        """Terms stored as buffers (not trained)."""
        return set()

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` completed with defaults; unknown keys or values raise ConfigError."""
        out = {k: v[0] for k, v in cls.option_choices.items()}
        for key, value in options.items():
            if key not in cls.option_choices:
                valid = ", ".join(cls.option_choices) or "none"
                raise ConfigError(
                    f"unknown option {key!r} for factorization {cls.name!r}; valid options: {valid}"
                )
            if value not in cls.option_choices[key]:
                raise ConfigError(
                    f"{cls.name} option {key}={value!r} is invalid; valid values: "
                    f"{', '.join(map(repr, cls.option_choices[key]))}"
                )
            out[key] = value
        return out

    @classmethod
    def check_axes(cls, axes: Sequence[str]) -> None:
        """Raise ConfigError if this factorisation cannot parameterise these axes."""
        if cls.max_order is not None and len(axes) > cls.max_order:
            extra = [a for a in axes if a not in ("in", "out")]
            raise ConfigError(
                f"factorization {cls.name!r} is order {cls.max_order} only and pairs with the "
                f"per-layer tensorisation (modes=[]); got extra modes {extra}. Use 'cp', "
                f"'tucker' or 'tt' for tensorised modes"
            )

    @classmethod
    def parameter_shapes(
        cls,
        axes: Sequence[str],
        shape: Sequence[int],
        rank: Any,
        options: Mapping[str, Any],
    ) -> dict[str, tuple[int, ...]]:
        """Shape of every term (trainable and fixed), without allocating anything."""
        sizes = dict(zip(axes, shape, strict=True)) | cls.label_sizes(axes, rank)
        return {
            name: tuple(sizes[l] for l in labels) for name, labels in cls.terms(axes, rank, options)
        }

    @classmethod
    def count(
        cls, axes: Sequence[str], shape: Sequence[int], rank: Any, options: Mapping[str, Any]
    ) -> int:
        """Number of trainable parameters."""
        fixed = cls.fixed_terms(options)
        shapes = cls.parameter_shapes(axes, shape, rank, options)
        return sum(math.prod(s) for n, s in shapes.items() if n not in fixed)

    # ------------------------------------------------------------------------ instance
    def __init__(
        self,
        axes: Sequence[str],
        shape: Sequence[int],
        rank: Rank,
        init: InitSpec | str | Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.axes = tuple(axes)
        self.shape = tuple(int(n) for n in shape)
        self.check_axes(self.axes)
        self.rank = self.normalize_rank(self.axes, rank)
        self.options = self.check_options(options or {})
        self.init_spec = InitSpec.parse(init)
        self._terms = self.terms(self.axes, self.rank, self.options)
        shapes = self.parameter_shapes(self.axes, self.shape, self.rank, self.options)
        fixed = self.fixed_terms(self.options)
        for name, term_shape in shapes.items():
            data = torch.empty(term_shape, dtype=dtype or torch.float32, device=device)
            if name in fixed:
                self.register_buffer(name, data)
            else:
                self.register_parameter(name, nn.Parameter(data))
        self.zero_term = self._resolve_term(self.init_spec.zero or self.default_zero)
        self.reset_parameters()

    def _resolve_term(self, name: str) -> str:
        term_names = [n for n, _ in self._terms]
        if name in term_names:
            return name
        holders = [n for n, labels in self._terms if name in labels]
        if name in self.axes and holders:
            return holders[0]
        fused = [a for a in self.axes if name in a.split("*")]
        if fused:  # e.g. "in" names the term holding the fused axis "in*out"
            return self._resolve_term(fused[0])
        if name == "out" and "out" not in self.axes:
            return term_names[-1]
        raise ConfigError(
            f"init term {name!r} is not part of this {self.name} tensor; valid: terms "
            f"{term_names} or axes {list(self.axes)}"
        )

    def extra_repr(self) -> str:
        return f"axes={self.axes}, shape={self.shape}, rank={self.rank}, zero={self.zero_term!r}"

    def factors(self) -> list[tuple[torch.Tensor, tuple[str, ...]]]:
        """The network's tensors with their labels."""
        return [(getattr(self, name), labels) for name, labels in self._terms]

    def term_labels(self) -> dict[str, tuple[str, ...]]:
        """``{parameter name: labels}``."""
        return dict(self._terms)

    def axis_term(self, axis: str) -> tuple[str, int]:
        """The term holding ``axis`` and the dimension of that axis in it."""
        for name, labels in self._terms:
            if axis in labels:
                return name, labels.index(axis)
        raise KeyError(axis)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every term; :attr:`zero_term` becomes exactly zero (meta: no-op)."""
        spec = self.init_spec
        if any(t.is_meta for _, t in self.named_parameters()):
            return
        if spec.seed is None:
            self._draw_terms()
            return
        device = next(iter(self.parameters())).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(spec.seed)
            self._draw_terms()

    def _draw_terms(self) -> None:
        """Draw every term from the current random state (see :meth:`reset_parameters`)."""
        spec = self.init_spec
        for name, labels in self._terms:
            tensor = getattr(self, name)
            method = spec.methods.get(name)
            axis = next((l for l in labels if not l.startswith("~")), None)
            if method is None and axis is not None:
                method = spec.methods.get(axis)
            if name == self.zero_term:
                method = "zeros"
            elif name == "weights":
                method = spec.weights
            self._init_term(tensor, method or spec.method or self.default_method, labels, name)

    def _init_term(self, t: torch.Tensor, method: str, labels: tuple[str, ...], name: str) -> None:
        spec = self.init_spec
        if method == "zeros":
            t.zero_()
            return
        if name == "weights":
            if method == "ones":
                t.fill_(1.0)
            else:
                t.normal_(spec.weights_mean, spec.weights_std)
            return
        if method == "ones":
            t.fill_(1.0)
            return
        if method == "normal":
            t.normal_(0.0, spec.std)
            return
        work = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
        if method == "xavier_uniform":
            shape = t.shape if t.dim() >= 2 else (1, t.numel())
            mat = torch.empty(shape, dtype=work, device=t.device)
            nn.init.xavier_uniform_(mat)
            t.copy_(mat.reshape(t.shape))
            return
        if method == "uniform_rank":
            self._uniform_rank(t, labels, name, work)
            return
        # matrix-shaped methods act on a (axis, everything else) view
        axis_dims = [i for i, l in enumerate(labels) if not l.startswith("~")]
        lead = axis_dims[0] if axis_dims else 0
        moved = t.movedim(lead, 0)
        # drawn in float32 at least, then cast: half-precision QR is missing on some devices,
        # and the law of a half-precision factor is that of its float32 draw, rounded
        mat = torch.empty(moved.shape[0], max(1, moved[0].numel()), dtype=work, device=t.device)
        if method == "orthogonal":
            nn.init.orthogonal_(mat)
        elif method == "xavier_normal":
            nn.init.xavier_normal_(mat)
        elif method == "kaiming_uniform":
            bound = 1.0 / math.sqrt(mat.shape[0])
            mat.uniform_(-bound, bound)
        else:  # pragma: no cover - InitSpec.parse validates
            raise ConfigError(f"unknown init method {method!r}")
        moved.copy_(mat.reshape(moved.shape))

    def _uniform_rank(
        self, t: torch.Tensor, labels: tuple[str, ...], name: str, work: torch.dtype
    ) -> None:
        """``t ~ U(±g_i / √R)``: ``R`` the size of the first rank label, ``g_i`` the gain of
        coordinate ``i`` of the term's tensor axis (``gains``, repeated along the axis)."""
        ranks = [i for i, l in enumerate(labels) if l.startswith("~")]
        if not ranks:
            raise ConfigError(
                f"init method 'uniform_rank' needs a rank label on term {name!r} of this "
                f"{self.name} tensor (its labels are {list(labels)})"
            )
        fan = t.shape[ranks[0]]
        axes = [i for i, l in enumerate(labels) if not l.startswith("~")]
        gains = self.init_spec.gains
        gain = gains.get(name)
        if gain is None and axes:
            gain = gains.get(labels[axes[0]])
        gain = 1.0 if gain is None else gain
        draw = torch.empty(t.shape, dtype=work, device=t.device).uniform_(-1.0, 1.0)
        if isinstance(gain, (list, tuple)):
            if not axes:
                raise ConfigError(
                    f"init gains for term {name!r} is a list, but the term has no tensor axis "
                    "to repeat it along"
                )
            dim = axes[0]
            n = t.shape[dim]
            per = torch.tensor([gain[i % len(gain)] for i in range(n)], dtype=work)
            shape = [1] * t.dim()
            shape[dim] = n
            draw.mul_(per.to(t.device).reshape(shape))
        else:
            draw.mul_(float(gain))
        t.copy_(draw.mul_(1.0 / math.sqrt(fan)))

    def reconstruct(self) -> torch.Tensor:
        """The dense tensor ``T`` (axes in :attr:`axes` order)."""
        from ..contraction import einsum_labels

        operands = self.factors()
        return einsum_labels(operands, self.axes)


FACTORIZATIONS: Registry[FactorizedTensor] = Registry("factorization")
register_factorization = FACTORIZATIONS.register


def list_factorizations(pattern: str = "*") -> list[str]:
    """Registered factorisation names."""
    return FACTORIZATIONS.list(pattern)


def get_factorization(key: str | type[FactorizedTensor]) -> type[FactorizedTensor]:
    """The class registered as ``key`` (a FactorizedTensor subclass passes through)."""
    cls = FACTORIZATIONS.get(key)
    if not (isinstance(cls, type) and issubclass(cls, FactorizedTensor)):
        raise ConfigError(f"factorization {key!r} must subclass tensadapt.FactorizedTensor")
    return cls
