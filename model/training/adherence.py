"""Prompt adherence of text-to-image digit samples: does each digit a prompt states stand at
its stated place?

For a prompt, parse the scene it states (``scenes.parse``); for each stated digit, crop its
place's region of the sample, find the ink there, take the square around the ink's bounding
box, and classify it with the shipped digit classifier. A sample passes when every stated digit
is classified as itself at its place. Sizes are not judged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.training import motion, scenes
from model.training.evaluate import DigitClassifier, to_input

INK = 0.3  # a pixel is ink above this brightness (0..1)


def crop(image: torch.Tensor, place: str, side: int) -> torch.Tensor | None:
    """(1, S, S) in [-1, 1] -> (1, side, side): the square around the ink in ``place``'s
    region, resized; None where the region holds no ink."""
    return crop_region(image, scenes.REGIONS[place], side)


def crop_region(
    image: torch.Tensor, rows_cols: tuple[tuple[int, int], tuple[int, int]], side: int
) -> torch.Tensor | None:
    """``crop`` within the region ((r0, r1), (c0, c1)) of the image."""
    (r0, r1), (c0, c1) = rows_cols
    region = image[:, r0:r1, c0:c1]
    ink = ((region[0] + 1) / 2) > INK  # (h, w)
    rows, cols = ink.any(1).nonzero().squeeze(1), ink.any(0).nonzero().squeeze(1)
    if len(rows) == 0:
        return None
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    left, right = int(cols[0]), int(cols[-1]) + 1
    box = max(bottom - top, right - left)
    h, w = region.shape[1:]
    top = min(max((top + bottom - box) // 2, 0), max(h - box, 0))
    left = min(max((left + right - box) // 2, 0), max(w - box, 0))
    window = region[:, top : top + box, left : left + box]  # (1, <=box, <=box) at a border
    pad = (0, box - window.shape[2], 0, box - window.shape[1])
    window = F.pad(window, pad, value=-1.0)
    return F.interpolate(window[None], size=(side, side), mode="bilinear", align_corners=False)[0]


@dataclass(frozen=True)
class Judgement:
    prompt: str
    passed: bool
    seen: tuple[int | None, ...]  # per stated digit: the class seen at its place (None: no ink)


@torch.no_grad()
def judge(
    classifier: DigitClassifier, prompts: Sequence[str], images: torch.Tensor
) -> list[Judgement]:
    """Each uint8 (n, S, S, 1) or float (n, 1, S, S) sample against its prompt."""
    x = to_input(images, images.shape[1] if images.dtype == torch.uint8 else images.shape[-1])
    out = []
    for prompt, image in zip(prompts, x, strict=True):
        scene = scenes.parse(prompt)
        seen: list[int | None] = []
        for item in scene.items:
            window = crop(image, item.place, classifier.size)
            seen.append(None if window is None else int(classifier(window[None]).argmax(1)))
        stated = tuple(item.digit for item in scene.items)
        out.append(Judgement(prompt, tuple(seen) == stated, tuple(seen)))
    return out


def adherence(judgements: Sequence[Judgement]) -> float:
    """Share of samples that pass."""
    return sum(j.passed for j in judgements) / max(len(judgements), 1)


# ----------------------------------------------------------------------------- clips

WHOLE = ((0, scenes.CANVAS), (0, scenes.CANVAS))  # a moving digit may be anywhere
MIN_TRAVEL = 6.0  # pixels the ink's centre must travel along the stated axis


@dataclass(frozen=True)
class ClipJudgement:
    prompt: str
    seen: tuple[int | None, ...]  # per frame: the class seen (None: no ink)
    frames_passed: int  # frames whose digit is the stated one
    moved: bool  # the ink's centre moves as stated (``moves_as_stated``)


def centres(clip: torch.Tensor) -> torch.Tensor | None:
    """(1, F, S, S) in [-1, 1] -> (F, 2): each frame's ink centre (row, column), the ink's
    brightness above ``INK`` as weights; None where a frame holds no ink."""
    ink = (((clip[0] + 1) / 2) - INK).clamp(min=0)  # (F, S, S)
    mass = ink.sum((1, 2))  # (F,)
    if bool((mass == 0).any()):
        return None
    grid = torch.arange(clip.shape[-1], dtype=ink.dtype)
    rows = (ink.sum(2) * grid).sum(1) / mass
    cols = (ink.sum(1) * grid).sum(1) / mass
    return torch.stack([rows, cols], dim=1)


def moves_as_stated(clip: torch.Tensor, motion_name: str) -> bool:
    """Straight motions: the ink's centre ends at least ``MIN_TRAVEL`` pixels from where it
    started, in the stated direction, and travels further along the stated axis than across
    it. Bounces: it spans at least ``MIN_TRAVEL`` along the stated axis, more than across, and
    turns (steps both ways along the axis)."""
    at = centres(clip)
    if at is None:
        return False
    axis, direction = motion.MOTIONS[motion_name]
    along, across = at[:, axis], at[:, 1 - axis]
    if direction != 0:
        travel = float(along[-1] - along[0]) * direction
        return travel >= MIN_TRAVEL and travel > abs(float(across[-1] - across[0]))
    span = float(along.max() - along.min())
    steps = along.diff()
    turns = bool((steps > 0.5).any()) and bool((steps < -0.5).any())
    return span >= MIN_TRAVEL and span > float(across.max() - across.min()) and turns


@torch.no_grad()
def judge_clips(
    classifier: DigitClassifier, prompts: Sequence[str], clips: torch.Tensor
) -> list[ClipJudgement]:
    """Each clip, uint8 (n, F, S, S, 1) or float (n, 1, F, S, S), against its motion prompt
    (``motion.parse``): every frame's digit (the ink anywhere on the canvas) and the motion."""
    if clips.dtype == torch.uint8:  # (n, F, S, S, 1) -> (n, 1, F, S, S) in [-1, 1]
        clips = clips.permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    out = []
    for prompt, clip in zip(prompts, clips, strict=True):
        stated = motion.parse(prompt)
        seen: list[int | None] = []
        for frame in clip.unbind(1):  # (1, S, S) each
            window = crop_region(frame, WHOLE, classifier.size)
            seen.append(None if window is None else int(classifier(window[None]).argmax(1)))
        passed = sum(s == stated.digit for s in seen)
        out.append(ClipJudgement(prompt, tuple(seen), passed, moves_as_stated(clip, stated.motion)))
    return out


def frame_adherence(judgements: Sequence[ClipJudgement]) -> float:
    """Share of all frames whose digit is the stated one."""
    frames = sum(len(j.seen) for j in judgements)
    return sum(j.frames_passed for j in judgements) / max(frames, 1)


def motion_adherence(judgements: Sequence[ClipJudgement]) -> float:
    """Share of clips that move as stated."""
    return sum(j.moved for j in judgements) / max(len(judgements), 1)
