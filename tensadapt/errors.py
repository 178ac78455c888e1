"""Exception types raised by tensadapt.

Every error names the bad value and what would be valid. All derive from
:class:`TensadaptError`, and each also derives from the built-in type a user would
catch for that kind of mistake (``ValueError``, ``KeyError``, ...).
"""

from __future__ import annotations

__all__ = [
    "TensadaptError",
    "ConfigError",
    "UnknownNameError",
    "TargetResolutionError",
    "ModeError",
    "AdapterStateError",
    "CheckpointError",
]


class TensadaptError(Exception):
    """Base class of every tensadapt error."""


class ConfigError(TensadaptError, ValueError):
    """A configuration value is invalid (raised at construction)."""


class UnknownNameError(ConfigError, KeyError):
    """A name was looked up in a registry that does not hold it (a ConfigError and a KeyError)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TargetResolutionError(TensadaptError, ValueError):
    """The config's targets cannot be found in (or do not fit) the model."""


class ModeError(TensadaptError, ValueError):
    """A tensorisation mode cannot be applied to the resolved targets."""


class AdapterStateError(TensadaptError, RuntimeError):
    """An operation does not fit the adapter's current state (e.g. merging twice)."""


class CheckpointError(TensadaptError, ValueError):
    """A saved adapter cannot be loaded into this model."""
