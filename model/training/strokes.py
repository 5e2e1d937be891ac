"""Stroke width of digit images: the bold style the ``bold-strokes`` adapter learns, and the
one measure of ink its bench and tests report.

Images are (N, 1, H, W) in [-1, 1] (training data, decoded samples scaled back), ink is bright.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INK_LEVEL = 0.5  # a pixel is ink where its intensity in [0, 1] exceeds this


def bold(images: torch.Tensor) -> torch.Tensor:
    """Each digit with thicker strokes: a 3x3 max filter (grey dilation), about one pixel more
    ink on every side of a stroke. (N, 1, H, W) -> same shape and range."""
    return F.max_pool2d(images, kernel_size=3, stride=1, padding=1)


def ink_pixels(images: torch.Tensor) -> torch.Tensor:
    """Ink pixels per image, (N,): pixels brighter than ``INK_LEVEL`` of full scale. At one
    digit per image and a fixed stroke length this grows with the stroke width."""
    level = (images.float() + 1) / 2  # (N, 1, H, W) in [0, 1]
    return (level > INK_LEVEL).flatten(1).sum(1).float()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """A pipeline's decoded images (N, H, W, 1) uint8 -> (N, 1, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1
