"""Encoding generated images: single images and grids, PNG/JPEG/WebP bytes."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def to_pil(image: torch.Tensor) -> Image.Image:
    """(H, W, channels) uint8 -> PIL image (L for one channel, RGB for three)."""
    array = image.numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def grid(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """(n, H, W, c) uint8 -> one (rows*H', cols*W', c) image, near-square, zero padding.
    A single image is returned as it is."""
    n, h, w, c = images.shape
    if n == 1:
        return images[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = image
    return torch.from_numpy(out)


def encode(image: torch.Tensor, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    to_pil(image).save(buf, format=FORMATS[fmt])
    return buf.getvalue()
