"""Bundled digits made into moving-digit clips: shapes, motion, bounces, reproducibility."""

from __future__ import annotations

import torch

from model.training import data


def clips(seed: int, n: int = 6, **kw: int) -> torch.Tensor:
    digits = data.load("sklearn", 16, "train")
    return data.moving(digits, torch.arange(n), torch.Generator().manual_seed(seed), **kw)


def test_clips_keep_the_whole_digit_in_view_and_move() -> None:
    x = clips(0, frames=12, size=16, digit_size=10)
    assert x.shape == (6, 1, 12, 16, 16) and x.min() >= -1 and x.max() <= 1
    ink = (x + 1).sum(dim=(1, 3, 4))  # (n, frames): the digit never leaves the canvas
    torch.testing.assert_close(ink, ink[:, :1].expand_as(ink))
    moved = (x[:, :, 1:] - x[:, :, :-1]).abs().amax(dim=(1, 3, 4))  # (n, frames - 1)
    assert bool((moved > 0).all())  # every clip moves at every frame (speed >= 1)


def test_bounces_reverse_at_the_walls() -> None:
    pos, velocity = data._bounce(torch.tensor([[-1, 7], [3, 8]]), torch.tensor([[-2, 2]] * 2), 6)
    assert pos.tolist() == [[1, 5], [3, 4]]
    assert velocity.tolist() == [[2, -2], [-2, -2]]


def test_same_generator_seed_same_clips() -> None:
    assert torch.equal(clips(3), clips(3)) and not torch.equal(clips(3), clips(4))
