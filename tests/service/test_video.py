"""Clips encoded as users get them, decoded back with PyAV and Pillow."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import av
import numpy as np
import pytest
import torch
from PIL import Image

from service.video import encode_video


def clip(frames: int = 8, h: int = 16, w: int = 16, c: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (frames, h, w, c), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize(("frames", "h", "w", "c"), [(8, 16, 16, 1), (5, 33, 20, 3)])
def test_mp4_decodes_to_the_frame_count_and_size(frames: int, h: int, w: int, c: int) -> None:
    data = encode_video(clip(frames, h, w, c), "mp4", fps=8)
    with av.open(io.BytesIO(data)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == frames
    assert decoded[0].shape[:2] == (h + h % 2, w + w % 2)  # yuv420p: even sides


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_animated_images_hold_every_frame(fmt: str) -> None:
    frames = clip(6)
    image = Image.open(io.BytesIO(encode_video(frames, fmt, fps=4)))
    assert image.format == fmt.upper() and image.n_frames == 6 and image.size == (16, 16)
    image.seek(3)
    if fmt == "webp":  # lossless: the frame comes back as it went in
        got = torch.from_numpy(np.array(image.convert("L")))
        assert torch.equal(got, frames[3, ..., 0])


def test_bad_input_names_the_problem() -> None:
    with pytest.raises(ValueError, match="output_format"):
        encode_video(clip(), "avi")
    with pytest.raises(ValueError, match="frames"):
        encode_video(clip()[0], "mp4")


def test_the_service_and_the_engine_benchmark_import_without_pyav() -> None:
    """Only MP4 encoding needs PyAV: with it unimportable, the app, the worker and the engine
    benchmark import, and an animated GIF still encodes; an MP4 names the missing module."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["av"] = None  # import av raises ImportError
        import torch
        import loadtest.bench_fast_path, service.api, service.cli, service.worker
        from service.video import encode_video
        assert encode_video(torch.zeros(2, 4, 4, 1, dtype=torch.uint8), "gif")[:3] == b"GIF"
        try:
            encode_video(torch.zeros(2, 4, 4, 1, dtype=torch.uint8), "mp4")
        except ImportError as e:
            print("mp4:", e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "mp4: import of av halted" in proc.stdout
