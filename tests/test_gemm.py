"""The adapted maps' dense products on BLAS and on oneDNN (tensadapt.gemm)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import tensadapt as ta
from tensadapt import gemm

ONEDNN = gemm._onednn_check() == ""
needs_onednn = pytest.mark.skipif(not ONEDNN, reason=f"oneDNN matmul: {gemm._onednn_check()}")
BACKENDS = ["blas", pytest.param("onednn", marks=needs_onednn)]


def _ops(fn) -> list[str]:
    """The names of the operators ``fn()`` ran."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.key for e in prof.key_averages()]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_float64(name: str, bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(130, 48, generator=g), torch.randn(72, 48, generator=g)
    b = torch.randn(72, generator=g) if bias else None
    want = x.double() @ w.double().t() + (b.double() if bias else 0.0)
    with gemm.use_backend(name):
        got = gemm.linear(x, w, b)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("acc", [True, False])
def test_times_matches_float64(name: str, acc: bool) -> None:
    g = torch.Generator().manual_seed(2)
    gy, w = torch.randn(96, 72, generator=g), torch.randn(72, 48, generator=g)
    c = torch.randn(96, 48, generator=g) if acc else None
    want = gy.double() @ w.double() + (c.double() if acc else 0.0)
    with gemm.use_backend(name):
        got = gemm.times(gy, w, None if c is None else c.clone())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_onednn_runs_only_where_it_applies() -> None:
    x, w = torch.randn(gemm.MIN_ROWS, 32), torch.randn(16, 32)
    with gemm.use_backend("onednn"):
        assert any("_linear_pointwise" in k for k in _ops(lambda: gemm.linear(x, w)))
        # too few rows, another dtype, a strided input: BLAS
        for args in ((x[:-1], w), (x.double(), w.double()), (x.t().contiguous().t(), w)):
            assert not any("_linear_pointwise" in k for k in _ops(lambda a=args: gemm.linear(*a)))
    with gemm.use_backend("blas"):
        assert not any("_linear_pointwise" in k for k in _ops(lambda: gemm.linear(x, w)))


def test_backend_names_and_restore() -> None:
    before = gemm.backend()
    with pytest.raises(ValueError, match=r"expected one of \['auto', 'blas', 'onednn'\]"):
        gemm.set_backend("mkl")
    assert gemm.backend() == before
    with gemm.use_backend("blas") as active:
        assert active == "blas" == gemm.backend()
    assert gemm.backend() == before
    assert gemm.backend() in gemm.status()


def test_auto_follows_the_cpu() -> None:
    avx512 = "AVX512" in torch.backends.cpu.get_cpu_capability().upper()
    with gemm.use_backend("auto") as active:
        assert active == ("onednn" if avx512 and ONEDNN else "blas")


def test_bad_environment_value_is_named() -> None:
    code = "import tensadapt"
    env = {"TENSADAPT_GEMM": "fast", "PATH": ""}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "TENSADAPT_GEMM: expected one of ['auto', 'blas', 'onednn'], got 'fast'" in run.stderr


def _step(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    out = out if isinstance(out, torch.Tensor) else out.logits
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


def _model(family: str) -> tuple[nn.Module, dict]:
    """A tiny model whose adapted maps see at least ``MIN_ROWS`` tokens."""
    if family == "timm_vit":
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(  # 65 tokens an image
            img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=3
        )
        return model, {"x": torch.randn(2, 3, 32, 32)}
    from families import make

    model, _, _ = make("hf_bert")
    return model, {"input_ids": torch.randint(0, 100, (2, 40))}  # 80 tokens


@needs_onednn
@pytest.mark.parametrize("family", ["timm_vit", "hf_bert"])
@pytest.mark.parametrize(
    "preset",
    [
        ("lora", {"rank": 4, "targets": ["q", "k", "v", "o"]}),
        ("lora", {"rank": 4}),
        ("cara", {"rank": 4, "dropout": 0.0}),
        ("cara", {"rank": 4, "dropout": 0.0, "strategy": "materialise"}),
        ("cara", {"rank": 4}),
        ("fact_tk", {"rank": 4}),
    ],
    ids=["lora_attn", "lora_all", "cara", "cara_materialise", "cara_dropconnect", "fact_tk"],
)
def test_training_step_agrees_across_backends(family: str, preset: tuple) -> None:
    """Outputs and every gradient agree between the two backends, and oneDNN runs only
    when chosen."""
    torch.manual_seed(0)
    name, kw = preset
    base, inputs = _model(family)
    # training mode, dropout included: each step is seeded alike, so both draw the same masks
    model = ta.get_adapter_model(base.train(), ta.presets.get(name, **kw))
    for p in model.parameters():  # nonzero factors, so every update takes part
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    results = {}
    for backend in ("blas", "onednn"):
        with gemm.use_backend(backend):
            torch.manual_seed(1)
            ops = _ops(lambda: _step(model, inputs))
            torch.manual_seed(1)
            results[backend] = _step(model, inputs)
        assert any("_linear_pointwise" in k for k in ops) == (backend == "onednn")
    (y0, g0), (y1, g1) = results["blas"], results["onednn"]
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_dense_linear_matches_f_linear(name: str, bias: bool) -> None:
    """Output and the gradients of x, W and b against ``F.linear`` in float64."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 40, 24, generator=g)
    w = torch.randn(16, 24, generator=g)
    b = torch.randn(16, generator=g) if bias else None
    gy = torch.randn(3, 40, 16, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    with gemm.use_backend(name):
        ops = _ops(lambda: gemm.dense_linear(*leaves).backward(gy))
        got = gemm.dense_linear(*leaves)
    assert any("_linear_pointwise" in k for k in ops) == (name == "onednn")
    ref = [t.double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    want = nn.functional.linear(*ref)
    want.backward(gy.double())
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-4)
    for leaf, r in zip(leaves, ref):
        torch.testing.assert_close(leaf.grad.double(), r.grad, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_dense_linear_refuses_double_backward() -> None:
    x = torch.randn(gemm.MIN_ROWS, 8, requires_grad=True)
    w = torch.randn(4, 8, requires_grad=True)
    with gemm.use_backend("onednn"):
        y = gemm.dense_linear(x, w)
        (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable|differentiable"):
            gx.sum().backward()
