"""Target roles and their aliases.

A role names what a linear map does inside a transformer block: ``q k v o`` (attention),
``fc1 fc2`` (MLP) or ``gate up down`` (gated MLP). Aliases: ``attn`` = q,k,v,o;
``mlp`` = the MLP roles; ``all`` = both.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import ConfigError

__all__ = ["ROLES", "ATTENTION_ROLES", "MLP_ROLES", "ALIASES", "expand_roles", "role_index"]

ATTENTION_ROLES: tuple[str, ...] = ("q", "k", "v", "o")
MLP_ROLES: tuple[str, ...] = ("fc1", "fc2", "gate", "up", "down")
ROLES: tuple[str, ...] = ATTENTION_ROLES + MLP_ROLES
ALIASES: dict[str, tuple[str, ...]] = {
    "attn": ATTENTION_ROLES,
    "mlp": MLP_ROLES,
    "all": ROLES,
}
# Roles whose output (not input) is the residual-stream side.
DOWN_ROLES: frozenset[str] = frozenset({"fc2", "down"})


def expand_roles(targets: Iterable[str]) -> tuple[str, ...]:
    """Roles named by ``targets`` (aliases expanded), in canonical order, without repeats."""
    if isinstance(targets, str):
        targets = [targets]
    wanted: set[str] = set()
    for name in targets:
        if name in ALIASES:
            wanted.update(ALIASES[name])
        elif name in ROLES:
            wanted.add(name)
        else:
            raise ConfigError(
                f"unknown target role {name!r}; valid roles are {', '.join(ROLES)} "
                f"and aliases {', '.join(ALIASES)}"
            )
    return tuple(r for r in ROLES if r in wanted)


def role_index(role: str) -> int:
    """Position of ``role`` in the canonical order (q, k, v, o, fc1, fc2, gate, up, down)."""
    return ROLES.index(role)
