"""Clips of digits in motion on the text-to-image canvas, and the captions that state the motion:
the data of the text-to-video digits model (``digits-t2v-skip``) and what its evaluator parses.

A clip holds one digit (a glyph of the bundled train split, small or large as in
``model.training.scenes``) on the 32x32 canvas, moving across it in a straight line ("a 3
moving left": it starts at the right edge and ends at the left one) or bouncing along an axis
("a 5 bouncing up and down"), the other axis at the canvas centre (jittered). A caption states
the digit and the motion, sometimes the size, in one of several wordings. Held out of training
entirely, for the evaluator: some wordings (``HELD_OUT``) and some (digit, motion) combinations
(``HELD_OUT_COMBOS``: each digit with one motion, each motion with at least one digit). Held-out
wordings use only words training captions use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from model.training import scenes

# motion -> (axis: 0 rows / 1 columns, direction: -1 towards 0, +1 away, 0 bouncing)
MOTIONS = {
    "left": (1, -1),
    "right": (1, 1),
    "up": (0, -1),
    "down": (0, 1),
    "up and down": (0, 0),
    "left and right": (1, 0),
}
PHRASES = {
    "left": "moving left",
    "right": "moving right",
    "up": "moving up",
    "down": "moving down",
    "up and down": "bouncing up and down",
    "left and right": "bouncing left and right",
}
NAMES = tuple(MOTIONS)
# Motion words a text-to-image model lacks, each with the place word its straight motion ends at:
# a text-to-video run starts the new word's embedding as that word's (``t2i.start_from``), so
# "up" and "down" start where "left" and "right" do, words the image model already places.
LIKE = {"up": "top", "down": "bottom"}
HELD_OUT_COMBOS = frozenset((d, NAMES[d % len(NAMES)]) for d in range(10))
MARGIN = 1  # pixels between a moving digit and the canvas edge at either end of its path


@dataclass(frozen=True)
class Clip:
    """What a clip shows: a digit, how it moves, its size (None: not stated, a caption's)."""

    digit: int
    motion: str
    size: str | None

    @property
    def held_out_combo(self) -> bool:
        return (self.digit, self.motion) in HELD_OUT_COMBOS


@dataclass(frozen=True)
class Wording:
    """A caption template over ``{d}`` (digit), ``{M}`` (motion phrase), ``{s}`` (size)."""

    text: str

    def caption(self, clip: Clip) -> str:
        return self.text.format(d=clip.digit, M=PHRASES[clip.motion], s=clip.size)

    def fits(self, clip: Clip) -> bool:
        return clip.size is not None or "{s}" not in self.text

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        motions = "|".join(re.escape(p) for p in PHRASES.values())
        groups = {"d": r"(?P<d>\d)", "M": f"(?P<M>{motions})", "s": r"(?P<s>small|large)"}
        return scenes.template_pattern(self.text, groups)

    def digit_span(self, caption: str) -> tuple[tuple[int, int], Clip] | None:
        """The stated digit's (start, end) characters and the clip the caption states (size
        None where unstated); None for a caption of another wording."""
        match = self.pattern.match(caption)
        if match is None:
            return None
        g = match.groupdict()
        motion = next(m for m, phrase in PHRASES.items() if phrase == g["M"])
        return match.span("d"), Clip(int(g["d"]), motion, g.get("s"))


TRAIN = (
    Wording("a {d} {M}"),
    Wording("a {s} {d} {M}"),
    Wording("the digit {d} {M}"),
    Wording("{M}, a {d}"),
)
HELD_OUT = (
    Wording("the {s} digit {d} {M}"),
    Wording("{M}, the digit {d}"),
)


def digit_span(caption: str) -> tuple[tuple[int, int], Clip]:
    """The stated digit's characters and the clip a caption states, in any wording; ValueError
    for a caption no wording makes."""
    for wording in (*TRAIN, *HELD_OUT):
        found = wording.digit_span(caption.strip())
        if found is not None:
            return found
    raise ValueError(f"prompt: no motion wording matches {caption!r}")


def parse(caption: str) -> Clip:
    """The clip a caption states, in any wording (held out or not)."""
    return digit_span(caption)[1]


def random_clip(
    g: torch.Generator, held_out: bool | None = False, boost: Mapping[str, float] | None = None
) -> Clip:
    """A clip drawn from ``g``. ``held_out``: False never a held-out (digit, motion)
    combination (training), True always one, None either. ``boost``: motions drawn that many
    times as often as the others (none: every motion alike, the draw unchanged)."""
    sizes = list(scenes.SIZES)
    weights = torch.tensor([boost.get(m, 1.0) for m in NAMES]) if boost else None
    while True:
        digit = scenes.pick(g, 10)
        if weights is None:
            name = NAMES[scenes.pick(g, len(NAMES))]
        else:
            name = NAMES[int(torch.multinomial(weights, 1, generator=g))]
        clip = Clip(digit, name, sizes[scenes.pick(g, 2)])
        if held_out is None or clip.held_out_combo == held_out:
            return clip


def caption(clip: Clip, wordings: Sequence[Wording], g: torch.Generator) -> str:
    """The clip in one of ``wordings`` that fits it, drawn from ``g``."""
    fitting = [w for w in wordings if w.fits(clip)]
    return fitting[scenes.pick(g, len(fitting))].caption(clip)


def path(clip: Clip, frames: int, g: torch.Generator) -> torch.Tensor:
    """(frames, 2) top-left corners (row, column) of the digit in each frame: along the
    motion's axis from edge to edge (a straight motion) or a triangle wave between the edges
    starting at a random phase (a bounce); the other axis centred, jittered by up to
    ``scenes.JITTER``."""
    px = scenes.SIZES[clip.size or "large"]
    axis, direction = MOTIONS[clip.motion]
    low, high = MARGIN, scenes.CANVAS - px - MARGIN
    f = torch.arange(frames, dtype=torch.float32)
    if direction != 0:
        share = f / max(frames - 1, 1)  # 0 -> 1 over the clip
        along = low + (high - low) * (share if direction > 0 else 1 - share)
    else:  # a triangle wave: one full period over the clip
        phase = torch.rand((), generator=g)
        wave = ((f / frames + phase) % 1.0 * 2 - 1).abs()  # 1 -> 0 -> 1
        along = low + (high - low) * wave
    jitter = int(torch.randint(-scenes.JITTER, scenes.JITTER + 1, (), generator=g))
    across = torch.full((frames,), float(scenes.CANVAS // 2 - px // 2 + jitter))
    corners = [along, across] if axis == 0 else [across, along]
    return torch.stack(corners, dim=1).round().long()


class ClipRenderer:
    """Draws clips with glyphs of a bundled digit set (its train split), as
    ``scenes.Renderer`` draws still scenes; ``boost``: motions a batch draws that many times as
    often as the others (``random_clip``)."""

    def __init__(
        self, frames: int, source: str = "sklearn", boost: Mapping[str, float] | None = None
    ):
        self.frames = frames
        self.still = scenes.Renderer(source)
        self.boost = dict(boost or {})

    def render(self, clip: Clip, g: torch.Generator) -> torch.Tensor:
        """(1, F, CANVAS, CANVAS) in [-1, 1]: one glyph of the digit along its path."""
        glyph = self.still.glyph(clip.digit, clip.size or "large", g)  # (1, px, px)
        px = glyph.shape[-1]
        video = torch.zeros(1, self.frames, scenes.CANVAS, scenes.CANVAS)
        for f, (top, left) in enumerate(path(clip, self.frames, g).tolist()):
            video[:, f, top : top + px, left : left + px] = glyph
        return video * 2 - 1

    def batch(
        self, n: int, g: torch.Generator, wordings: Sequence[Wording] = TRAIN
    ) -> tuple[torch.Tensor, list[str]]:
        """n training clips (none a held-out combination): (n, 1, F, S, S), captions."""
        clips = [random_clip(g, boost=self.boost) for _ in range(n)]
        videos = torch.stack([self.render(c, g) for c in clips])
        return videos, [caption(c, wordings, g) for c in clips]


def corpus() -> Iterator[str]:
    """Every caption training can produce (the words a tokenizer must know)."""
    for wording in TRAIN:
        for digit in range(10):
            for motion in NAMES:
                for size in scenes.SIZES:
                    clip = Clip(digit, motion, size)
                    if not clip.held_out_combo:
                        yield wording.caption(clip)


def held_out_prompts(n: int = 100, seed: int = 0) -> list[str]:
    """``n`` evaluation prompts, each held out of training in one way or both: the first half
    in a held-out wording (any combination), the rest stating a held-out (digit, motion)
    combination (in any wording)."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        if i < n // 2:
            prompts.append(caption(random_clip(g, held_out=None), HELD_OUT, g))
        else:
            prompts.append(caption(random_clip(g, held_out=True), (*TRAIN, *HELD_OUT), g))
    return prompts
