"""Generated images as arrays: one near-square (or fixed-width) grid, PIL conversion, and
animated GIF / WebP files of frames."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(H, W, channels) uint8 -> PIL image (L for one channel, RGB for three)."""
    array = image.numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def grid(images: torch.Tensor, cols: int | None = None, pad: int = 2) -> torch.Tensor:
    """(n, H, W, c) uint8 -> one (rows*H', cols*W', c) image with zero padding; ``cols``
    defaults to a near-square layout. A single image is returned as it is."""
    n, h, w, c = images.shape
    if n == 1:
        return images[0]
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i, image in enumerate(images.numpy()):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[top : top + h, left : left + w] = image
    return torch.from_numpy(out)


ANIMATION_FORMATS = ("gif", "webp")


def animate(frames: torch.Tensor, fmt: str = "gif", fps: float = 8.0) -> bytes:
    """(F, H, W, channels) uint8 frames -> an endlessly looping animated GIF or (lossless) WebP
    file's bytes."""
    if fmt not in ANIMATION_FORMATS:
        raise ValueError(f"fmt: must be one of {list(ANIMATION_FORMATS)}, got {fmt!r}")
    images = [to_pil(frame) for frame in frames]
    buf = io.BytesIO()
    options = {"lossless": True} if fmt == "webp" else {}
    images[0].save(
        buf,
        format=fmt.upper(),
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
        **options,
    )
    return buf.getvalue()
