"""Encoding generated images as PNG/JPEG/WebP bytes."""

from __future__ import annotations

import io

import torch

from model.sampling.images import to_pil

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode(image: torch.Tensor, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    to_pil(image).save(buf, format=FORMATS[fmt])
    return buf.getvalue()
