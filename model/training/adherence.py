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

from model.training import scenes
from model.training.evaluate import DigitClassifier, to_input

INK = 0.3  # a pixel is ink above this brightness (0..1)


def crop(image: torch.Tensor, place: str, side: int) -> torch.Tensor | None:
    """(1, S, S) in [-1, 1] -> (1, side, side): the square around the ink in ``place``'s
    region, resized; None where the region holds no ink."""
    (r0, r1), (c0, c1) = scenes.REGIONS[place]
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
