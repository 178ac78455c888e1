"""Deterministic, stratified train/test splits and subsamples of labelled data."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

from ..errors import ConfigError

__all__ = ["DataSplits", "make_splits", "split_indices", "stratified_choice", "subsample"]

X = TypeVar("X", torch.Tensor, list[str])

# Independent random streams, so e.g. the test set does not depend on ``n_train``.
_SPLIT, _TRAIN, _TEST = 0, 1, 2


@dataclass(frozen=True)
class DataSplits(Generic[X]):
    """A labelled dataset split in train and test parts.

    ``x_*`` are image tensors (``N x C x H x W``, float32 in [0, 1]) or lists of strings;
    ``y_*`` are int64 label tensors indexing ``classes``.
    """

    x_train: X
    y_train: torch.Tensor
    x_test: X
    y_test: torch.Tensor
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def stratified_choice(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n`` positions of ``labels`` at random, keeping class proportions.

    Each class gets the floor of its proportional quota; the remaining picks go to the
    classes with the largest fractional remainders. The result is in random order.

    Raises:
        ConfigError: ``n`` is negative or larger than ``len(labels)``.
    """
    if not 0 <= n <= len(labels):
        raise ConfigError(f"cannot pick {n} of {len(labels)} examples")
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (n / max(len(labels), 1))
    take = np.floor(quota).astype(np.int64)
    extra = np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]
    take[extra] += 1
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take) if k]
    chosen = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
    return rng.permutation(chosen)


def split_indices(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return stratified ``(train, test)`` index arrays; ``test`` holds ``test_fraction``."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = _rng(seed, _SPLIT)
    test = stratified_choice(labels, round(test_fraction * len(labels)), rng)
    mask = np.ones(len(labels), dtype=bool)
    mask[test] = False
    return rng.permutation(np.flatnonzero(mask)), test


def subsample(
    indices: np.ndarray, labels: np.ndarray, n: int | None, seed: int, stream: int
) -> np.ndarray:
    """Keep a stratified random ``n`` of ``indices`` (all of them, shuffled, if ``n`` is None)."""
    rng = _rng(seed, stream)
    if n is None:
        return rng.permutation(indices)
    return indices[stratified_choice(labels[indices], n, rng)]


def make_splits(
    labels: np.ndarray,
    take: Callable[[np.ndarray], X],
    classes: Sequence[str],
    *,
    seed: int,
    n_train: int | None,
    n_test: int | None,
    test_fraction: float | None = None,
    test_mask: np.ndarray | None = None,
) -> DataSplits[X]:
    """Split, subsample and materialise a dataset.

    Args:
        labels: Integer label of every example.
        take: Builds the inputs for an index array (so only kept examples are converted).
        classes: Class names, indexed by label.
        seed: Seed of every random choice.
        n_train, n_test: Optional stratified subsample sizes.
        test_fraction: Fraction held out for test (datasets without an official split).
        test_mask: Official split: True for test examples (used instead of ``test_fraction``).
    """
    if test_mask is not None:
        train, test = np.flatnonzero(~test_mask), np.flatnonzero(test_mask)
    else:
        train, test = split_indices(labels, 0.2 if test_fraction is None else test_fraction, seed)
    train = subsample(train, labels, n_train, seed, _TRAIN)
    test = subsample(test, labels, n_test, seed, _TEST)
    y = torch.as_tensor(labels, dtype=torch.int64)
    return DataSplits(
        x_train=take(train),
        y_train=y[torch.from_numpy(train)],
        x_test=take(test),
        y_test=y[torch.from_numpy(test)],
        classes=tuple(classes),
    )
