"""Shared fixtures: tiny randomly initialised models (no weights are ever downloaded)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_vit(depth: int = 2, dim: int = 16, heads: int = 2, num_classes: int = 3, **kw):
    """A timm VisionTransformer small enough for exhaustive tests (fused attn.qkv)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=16,
        patch_size=8,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=4.0,
        num_classes=num_classes,
        **kw,
    )


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return tiny_vit().eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _restore_registries():
    """Registrations made inside a test (user modes, user factorisations) end with it."""
    from tensadapt.factorizations.base import FACTORIZATIONS
    from tensadapt.modes import MODES

    saved = [(reg, dict(reg._items)) for reg in (FACTORIZATIONS, MODES)]
    yield
    for reg, items in saved:
        reg._items.clear()
        reg._items.update(items)


@pytest.fixture
def native_off():
    """Switches the native passes off for the duration of a block: ``with native_off(): ...``"""
    import contextlib

    from tensadapt import native

    @contextlib.contextmanager
    def off():
        state = native._state
        native._state = "off"
        try:
            yield
        finally:
            native._state = state

    return off


@pytest.fixture(params=["avx2", "avx512"])
def each_isa(request):
    """Runs a test once per instruction set of the native kernels (skipped where the CPU or
    the build lacks it), then restores the set in use."""
    from tensadapt import native

    if not native.available():
        pytest.skip(f"native kernels unavailable: {native.status()}")
    before = native.isa()
    if native.use_isa(request.param) != request.param:
        native.use_isa(before)
        pytest.skip(f"this CPU lacks {request.param}")
    yield request.param
    native.use_isa(before)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster than two, and much faster on a loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_noop_then_trains(model, config, x, y, steps: int = 20) -> None:
    """The adapted model equals the base at init, and ``steps`` AdamW steps on the fixed
    batch lower the cross-entropy (the head is frozen by the caller's config)."""
    import tensadapt as ta

    with torch.no_grad():
        base = model(x)
    am = ta.get_adapter_model(model, config)
    with torch.no_grad():
        assert torch.equal(am(x), base)
    opt = torch.optim.AdamW([p for p in am.parameters() if p.requires_grad], lr=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        start = loss_fn(am(x), y).item()
    am.train()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(am(x), y).backward()
        opt.step()
    am.eval()
    with torch.no_grad():
        end = loss_fn(am(x), y).item()
    assert end < start - 1e-3, (start, end)
