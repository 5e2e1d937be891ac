"""Judging generated digits: a small classifier we train and ship, and the metrics built on it.

- class accuracy: does a requested 7 look like a 7 to the classifier; for clips, of every
  frame, the classifier seeing the digit-sized window around the frame's ink (a 10 px digit
  on a 16 px canvas, seen whole, scores 27% on real clips; cropped and resized, 95%);
- temporal consistency of clips: mean absolute change between consecutive frames (real clips
  give the reference: a frozen clip scores 0, flicker scores high);
- FID on the classifier's penultimate features against held-out real digits (Frechet distance
  of Gaussians fitted to the two feature sets; smaller is closer);
- PSNR / SSIM of cached against uncached output of the same seed (torchmetrics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from model.training import data
from model.training.options import CLASSIFIER_DIR


class DigitClassifier(nn.Module):
    """(B, 1, S, S) in [-1, 1] -> 10 logits; ``features`` is the 128-d penultimate layer."""

    def __init__(self, size: int = 16, source: str = "mnist"):
        super().__init__()
        self.size = size
        self.source = source  # the bundled digit set it was trained on (and is judged against)
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Linear(64 * (size // 4) ** 2, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))  # (B, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10)


def to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (n, H, W, 1) images or float (n, 1, H, W) in [-1, 1] -> (n, 1, size, size)."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1 if images.dtype == torch.uint8 else images
    if x.shape[-1] != size:
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False)
    return x.float()


def train_classifier(
    source: str = "mnist", size: int = 16, epochs: int = 6, seed: int = 0
) -> tuple[DigitClassifier, float]:
    """Train on the train split with light shift augmentation; returns (model, held-out acc)."""
    torch.manual_seed(seed)
    train, held = data.load(source, size, "train"), data.load(source, size, "held_out")
    model = DigitClassifier(size, source)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(train.labels), generator=g)
        for idx in order.split(64):
            x = train.images[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model(x), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model, accuracy(model, held.images, held.labels)


def save_classifier(model: DigitClassifier, directory: Path, card: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), directory / "classifier.safetensors")
    meta = {"size": model.size, "source": model.source, **card}
    (directory / "classifier.json").write_text(json.dumps(meta, indent=2))


def load_classifier(directory: Path = CLASSIFIER_DIR) -> DigitClassifier:
    meta = json.loads((directory / "classifier.json").read_text())
    model = DigitClassifier(meta["size"], meta["source"])
    model.load_state_dict(load_file(directory / "classifier.safetensors"), strict=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = model(to_input(images, model.size)).argmax(1)
    return (predicted == labels).float().mean().item()


def digit_crops(frames: torch.Tensor, box: int) -> torch.Tensor:
    """(n, 1, S, S) frames in [-1, 1] -> (n, 1, box, box): each frame's window centred on the
    centre of mass of its ink, moved inside the frame where it would cross the border."""
    ink = ((frames[:, 0] + 1) / 2).clamp(0, 1)  # (n, S, S)
    side = frames.shape[-1]
    at = torch.arange(side, dtype=ink.dtype)
    mass = ink.sum((1, 2)).clamp_min(1e-6)  # (n,)
    centre = torch.stack([(ink.sum(2) * at).sum(1), (ink.sum(1) * at).sum(1)], 1) / mass[:, None]
    corner = (centre - (box - 1) / 2).round().long().clamp(0, side - box)  # (n, 2) top, left
    windows = zip(frames, corner.tolist(), strict=True)
    return torch.stack([f[:, top : top + box, left : left + box] for f, (top, left) in windows])


@torch.no_grad()
def frame_accuracy(
    model: DigitClassifier, clips: torch.Tensor, labels: torch.Tensor, box: int
) -> float:
    """Share of all frames of uint8 clips (n, F, H, W, 1) classified as their clip's label
    (n,), each frame judged on its ``box``-sized window around the digit."""
    f, side = clips.shape[1:3]
    frames = to_input(clips.flatten(0, 1), side)  # (n*F, 1, H, W) in [-1, 1]
    return accuracy(model, digit_crops(frames, box), labels.repeat_interleave(f))


def temporal_difference(clips: torch.Tensor) -> float:
    """Mean absolute change between consecutive frames of uint8 clips (n, F, H, W, c), as a
    fraction of full scale."""
    x = clips.float() / 255
    return (x[:, 1:] - x[:, :-1]).abs().mean().item()


@torch.no_grad()
def features(model: DigitClassifier, images: torch.Tensor) -> np.ndarray:
    return model.features(to_input(images, model.size)).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two (n, d) feature sets.

    tr(sqrt(cov_a cov_b)) is the sum of the square roots of the product's eigenvalues (real and
    >= 0 in exact arithmetic): no matrix square root, so a rank-deficient covariance (fewer
    samples than feature dimensions) needs no special case."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_root = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b) - 2 * trace_root)


def psnr_ssim(images: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB) and SSIM of uint8 (n, H, W, c) images against a same-shape reference."""
    x = images.permute(0, 3, 1, 2).float() / 255
    y = reference.permute(0, 3, 1, 2).float() / 255
    psnr = peak_signal_noise_ratio(
        x, y, data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3)
    )
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, kernel_size=5)
    # a tuple only with return_full_image or return_contrast_sensitivity
    return float(psnr), float(cast(torch.Tensor, ssim))
