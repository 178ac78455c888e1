"""Factor products shared by many modules, formed once per forward pass of the model.

Many adapted modules contract the same factors and differ only in the coordinate of a
structural axis (the depth, the role, the slice): CaRA's ``B`` for block ``l`` is
``λ ⊙ D[l] ⊙ H ⊙ O`` for every ``l``. Formed module by module, that is dozens of tiny
contractions (and as many backward nodes) per step. :class:`StepCache` holds the product for
every coordinate at once, formed by the first module that asks, split into per-module blocks
by one ``unbind`` (one backward node for all of them).

The cache lives for one forward pass of the model: the model opens it when its forward
starts and closes (empties) it when the forward returns or raises. Outside that window
:meth:`StepCache.get` returns None and each module forms its own slice: a submodule
called on its own, a forward under activation checkpointing or ``save_on_cpu`` (saved-tensor
hooks), a recomputation inside a backward, a ``torch.compile`` trace. So two forward passes
never share a graph. Within a pass an entry is reused only while its sources keep their
identity, storage and version counter, and until a backward has gone through it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

__all__ = ["StepCache"]

Blocks = tuple[torch.Tensor, ...]


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _saving_through_hooks() -> bool:
    """Whether saved tensors go through hooks (activation checkpointing, ``save_on_cpu``):
    a recomputed forward must save what the first one saved, so no module may lean on a
    product another module formed."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class StepCache:
    """``get(key, sources, build)``: ``build()``'s blocks, shared within one forward pass."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple, Blocks, list[bool]]] = {}
        self._scratch: dict[Hashable, Any] = {}
        self._depth = 0

    def open(self) -> None:
        """A forward pass of the model starts."""
        if not torch.compiler.is_compiling():
            self._depth += 1

    def close(self) -> None:
        """The forward pass ends: drop every entry."""
        if not torch.compiler.is_compiling():
            self._depth = max(self._depth - 1, 0)
            if self._depth == 0:
                self._entries.clear()
                self._scratch.clear()

    def _active(self) -> bool:
        if self._depth == 0 or torch.compiler.is_compiling():
            return False
        return not (_in_backward() or _saving_through_hooks())

    def scratch(self) -> dict[Hashable, Any] | None:
        """A dict that lives for this forward pass (emptied when it ends), or None outside
        the window in which :meth:`get` shares products (the caller then works alone)."""
        return self._scratch if self._active() else None

    def get(
        self,
        key: Hashable,
        sources: Sequence[torch.Tensor],
        build: Callable[[], tuple[torch.Tensor, Blocks]],
    ) -> Blocks | None:
        """The blocks of ``build() -> (product, blocks)`` for the current sources, or None
        outside a forward pass of the model (the caller then forms its own slice)."""
        if not self._active():
            return None
        stamp = (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            tuple((id(t), t.data_ptr(), t._version) for t in sources),
        )
        entry = self._entries.get(key)
        if entry is not None and entry[0] == stamp and entry[2][0]:
            return entry[1]
        product, blocks = build()
        live = [True]
        if product.requires_grad:  # a backward through it frees its graph: rebuild after
            product.register_hook(lambda _grad: live.__setitem__(0, False))
        self._entries[key] = (stamp, blocks, live)
        return blocks

    def __deepcopy__(self, memo: dict) -> StepCache:
        return StepCache()

    def __getstate__(self) -> dict:
        return {"_entries": {}, "_scratch": {}, "_depth": 0}
