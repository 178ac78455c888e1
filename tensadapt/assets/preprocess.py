"""Turn small (grayscale) image tensors into normalised RGB inputs for ViTs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "to_rgb_resized"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb_resized(
    images: torch.Tensor,
    size: int | tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Resize, make 3-channel and normalise a batch of images.

    Args:
        images: ``N x H x W``, ``N x 1 x H x W`` or ``N x 3 x H x W``; uint8 in [0, 255] or
            floating point in [0, 1].
        size: Output side (or ``(height, width)``), e.g. a multiple of 14 for DINOv2.
        mean, std: Per-channel normalisation (ImageNet by default).

    Returns:
        Float32 tensor ``N x 3 x size x size``: ``(resized - mean) / std``. Resizing is
        bilinear, antialiased when shrinking.
    """
    x = images.unsqueeze(1) if images.dim() == 3 else images
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected N x H x W or N x {{1,3}} x H x W images, got {tuple(x.shape)}")
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) != hw:
        x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True)
    x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
