"""Rank validation shared by the factorisations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import ConfigError

__all__ = ["positive_int", "per_axis_ranks"]


def positive_int(value: object, what: str) -> int:
    """``value`` if it is an int > 0 (bools rejected), else ConfigError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{what} must be a positive int, got {value!r}")
    return value


def per_axis_ranks(name: str, keys: Sequence[str], rank: object) -> dict[str, int]:
    """One rank per key from an int (all equal), a mapping over ``keys`` or a sequence."""
    if isinstance(rank, Mapping):
        unknown = [k for k in rank if k not in keys]
        if unknown:
            raise ConfigError(
                f"{name} rank names modes {unknown} that this tensor does not have; "
                f"valid keys: {list(keys)}"
            )
        missing = [k for k in keys if k not in rank]
        if missing:
            raise ConfigError(
                f"{name} rank mapping has no rank for {missing}; give one for each of {list(keys)}"
            )
        return {k: positive_int(rank[k], f"{name} rank for {k!r}") for k in keys}
    if isinstance(rank, Sequence) and not isinstance(rank, str):
        if len(rank) != len(keys):
            raise ConfigError(
                f"{name} rank list has {len(rank)} entries; expected {len(keys)} for {list(keys)}"
            )
        return {k: positive_int(r, f"{name} rank for {k!r}") for k, r in zip(keys, rank)}
    r = positive_int(rank, f"{name} rank")
    return dict.fromkeys(keys, r)
