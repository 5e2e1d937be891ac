"""Encoding generated clips: MP4 (H.264 through PyAV), animated GIF and WebP (Pillow, through
``model.sampling.images.animate``). PyAV is imported when an MP4 is encoded, so everything else
(the engine, the workers, the benchmarks) runs where it is not installed."""

from __future__ import annotations

import io
from fractions import Fraction

import numpy as np
import torch

from model.sampling.images import animate

VIDEO_FORMATS = ("mp4", "gif", "webp")
VIDEO_CONTENT_TYPES = {"mp4": "video/mp4", "gif": "image/gif", "webp": "image/webp"}


def encode_video(frames: torch.Tensor, fmt: str = "mp4", fps: float = 8.0) -> bytes:
    """(F, H, W, channels) uint8 frames -> the file's bytes."""
    if frames.ndim != 4 or frames.dtype != torch.uint8:
        raise ValueError(
            f"frames: want (F, H, W, c) uint8, got {tuple(frames.shape)} {frames.dtype}"
        )
    if fmt == "mp4":
        return _mp4(frames, fps)
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"output_format: must be one of {list(VIDEO_FORMATS)}, got {fmt!r}")
    return animate(frames, fmt, fps)


def _mp4(frames: torch.Tensor, fps: float) -> bytes:
    """H.264 in MP4, yuv420p (what browsers play): odd sides are padded by one black pixel."""
    import av  # only MP4 needs PyAV

    rgb = frames.expand(-1, -1, -1, 3) if frames.shape[-1] == 1 else frames  # (F, H, W, 3)
    h, w = rgb.shape[1:3]
    array = np.zeros((len(rgb), h + h % 2, w + w % 2, 3), dtype=np.uint8)
    array[:, :h, :w] = rgb.numpy()
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        # Exact for rates like 16/3 (a clip of 16 frames in 3 seconds).
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = array.shape[2], array.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for image in array:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())  # flush
    return buf.getvalue()
