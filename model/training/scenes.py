"""Scenes of digits on a 32x32 canvas and the captions that state them: the data of the
text-to-image digits model (``digits-t2i-skip``) and what its prompt-adherence evaluator parses.

A scene holds one digit, at a place (left, right, top, bottom, centre), or two, side by side
(left and right) or stacked (top and bottom); each digit small (10 px) or large (16 px). A
caption states the digits and their places in one of several wordings ("a 7 on the left and a
2 on the right", "two digits: 3 above 8", "a large 5": a digit with no stated place is in the
centre). Held out of training entirely, for the evaluator: some wordings (``HELD_OUT``), and
some (digit, place) combinations (``HELD_OUT_COMBOS``: each digit at one place, each place
with two digits). Held-out wordings use only words training captions use.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from model.training import data
from model.training.options import SCENE_JITTER

CANVAS = 32
PLACES = ("left", "right", "top", "bottom", "centre")
PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
SIZES = {"small": 10, "large": 16}
# Where each place's digit is centred (row, column), and the region (rows, columns) it stays in.
CENTRES = {
    "left": (16, 8),
    "right": (16, 24),
    "top": (8, 16),
    "bottom": (24, 16),
    "centre": (16, 16),
}
REGIONS = {
    "left": ((0, 32), (0, 16)),
    "right": ((0, 32), (16, 32)),
    "top": ((0, 16), (0, 32)),
    "bottom": ((16, 32), (0, 32)),
    "centre": ((4, 28), (4, 28)),
}
PAIRS = (("left", "right"), ("top", "bottom"))
JITTER = SCENE_JITTER  # pixels a digit may sit off its place's centre, each axis (by default)
HELD_OUT_COMBOS = frozenset((d, PLACES[d % len(PLACES)]) for d in range(10))


@dataclass(frozen=True)
class Item:
    digit: int
    place: str
    size: str | None  # None: not stated (a caption's); a rendered scene's items all have one


@dataclass(frozen=True)
class Scene:
    items: tuple[Item, ...]  # one, or a pair in PAIRS order (left then right, top then bottom)

    @property
    def places(self) -> tuple[str, ...]:
        return tuple(item.place for item in self.items)

    @property
    def held_out_combo(self) -> bool:
        return any((item.digit, item.place) in HELD_OUT_COMBOS for item in self.items)


# ----------------------------------------------------------------------------- wordings


@dataclass(frozen=True)
class Wording:
    """A caption template. Fields: ``{d}`` ``{s}`` ``{P}`` (one digit: digit, size word, place
    phrase) or ``{a}`` ``{b}`` ``{sa}`` ``{sb}`` (a pair, in ``places`` order). ``places``:
    the places it states, None for one digit at any place; () for one digit, unplaced
    (centre)."""

    text: str
    places: tuple[str, ...] | None

    def fits(self, scene: Scene) -> bool:
        if self.places is None:
            return len(scene.items) == 1
        if self.places == ():
            return scene.places == ("centre",)
        return scene.places == self.places

    def caption(self, scene: Scene) -> str:
        first = scene.items[0]
        fields = {"d": first.digit, "s": first.size, "P": PHRASES[first.place]}
        if len(scene.items) == 2:
            a, b = scene.items
            fields = {"a": a.digit, "b": b.digit, "sa": a.size, "sb": b.size}
        return self.text.format(**fields)

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """Matches the captions this wording makes; groups name the fields."""
        phrases = "|".join(re.escape(p) for p in PHRASES.values())
        return template_pattern(
            self.text,
            {
                "d": r"(?P<d>\d)",
                "a": r"(?P<a>\d)",
                "b": r"(?P<b>\d)",
                "s": r"(?P<s>small|large)",
                "sa": r"(?P<sa>small|large)",
                "sb": r"(?P<sb>small|large)",
                "P": f"(?P<P>{phrases})",
            },
        )

    def parse(self, caption: str) -> Scene | None:
        """The scene a caption of this wording states (unstated sizes None), else None."""
        spans = self.digit_spans(caption)
        return None if spans is None else Scene(tuple(item for _, item in spans))

    def digit_spans(self, caption: str) -> list[tuple[tuple[int, int], Item]] | None:
        """Each stated digit's (start, end) characters in a caption of this wording, with the
        item it states (unstated size None), in ``Scene`` order; None for another wording."""
        match = self.pattern.match(caption)
        if match is None:
            return None
        g = match.groupdict()
        if "a" in g:
            assert self.places is not None and len(self.places) == 2
            first = Item(int(g["a"]), self.places[0], g.get("sa"))
            second = Item(int(g["b"]), self.places[1], g.get("sb"))
            return [(match.span("a"), first), (match.span("b"), second)]
        place = "centre"
        if "P" in g:
            place = next(p for p, phrase in PHRASES.items() if phrase == g["P"])
        return [(match.span("d"), Item(int(g["d"]), place, g.get("s")))]


def template_pattern(text: str, groups: dict[str, str]) -> re.Pattern[str]:
    """A caption template ("a {d} {P}") as a regex matching its captions whole: each ``{field}``
    replaced by ``groups[field]`` (a named group), the rest literal."""
    parts = re.split(r"(\{\w+\})", text)
    body = "".join(groups[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{body}$")


LR, TB = PAIRS
TRAIN = (
    Wording("a {d} {P}", None),
    Wording("a {s} {d} {P}", None),
    Wording("{P}, a {d}", None),
    Wording("the digit {d} {P}", None),
    Wording("a {s} {d}", ()),
    Wording("the digit {d}", ()),
    Wording("a {a} on the left and a {b} on the right", LR),
    Wording("a {b} on the right and a {a} on the left", LR),
    Wording("a {sa} {a} on the left and a {sb} {b} on the right", LR),
    Wording("two digits: {a} above {b}", TB),
    Wording("a {a} at the top and a {b} at the bottom", TB),
    Wording("a {b} at the bottom and a {a} at the top", TB),
    Wording("{b} below {a}", TB),
)
HELD_OUT = (
    Wording("{P} a {d}", None),
    Wording("the {s} digit {d} {P}", None),
    Wording("a {a} on the left, a {b} on the right", LR),
    Wording("a {sb} {b} on the right and a {sa} {a} on the left", LR),
    Wording("{a} above {b}", TB),
    Wording("{a} at the top and {b} at the bottom", TB),
)


def parse(caption: str) -> Scene:
    """The scene a caption states, in any wording (held out or not). Raises ValueError for a
    caption no wording makes."""
    return Scene(tuple(item for _, item in digit_spans(caption.strip())))


def digit_spans(caption: str) -> list[tuple[tuple[int, int], Item]]:
    """Each stated digit's (start, end) characters in ``caption`` and the item it states, in
    any wording; ValueError for a caption no wording makes."""
    for wording in (*TRAIN, *HELD_OUT):
        spans = wording.digit_spans(caption)
        if spans is not None:
            return spans
    raise ValueError(f"prompt: no scene wording matches {caption!r}")


# ----------------------------------------------------------------------------- drawing scenes


def random_scene(g: torch.Generator, held_out: bool | None = False) -> Scene:
    """A scene drawn from ``g``: one digit (40%) or a pair. ``held_out``: False never holds a
    held-out (digit, place) combination (training), True always holds one, None either."""
    while True:
        if torch.rand((), generator=g) < 0.4:
            places: tuple[str, ...] = (PLACES[pick(g, len(PLACES))],)
        else:
            places = PAIRS[pick(g, len(PAIRS))]
        sizes = list(SIZES)
        items = tuple(Item(pick(g, 10), place, sizes[pick(g, len(sizes))]) for place in places)
        scene = Scene(items)
        if held_out is None or scene.held_out_combo == held_out:
            return scene


def caption(scene: Scene, wordings: Sequence[Wording], g: torch.Generator) -> str:
    """The scene in one of ``wordings`` that fits it, drawn from ``g``."""
    fitting = [w for w in wordings if w.fits(scene)]
    return fitting[pick(g, len(fitting))].caption(scene)


def pick(g: torch.Generator, n: int) -> int:
    """One of 0..n-1, drawn from ``g``."""
    return int(torch.randint(0, n, (), generator=g))


class Renderer:
    """Draws scenes with glyphs of a bundled digit set (its train split), each digit up to
    ``jitter`` pixels off its place's centre on each axis (inside its place's region)."""

    def __init__(self, source: str = "sklearn", jitter: int = JITTER):
        self.jitter = jitter
        digits = data.load(source, size=max(SIZES.values()), split="train")
        self.glyphs = {
            size: ((F.interpolate(digits.images, size=(px, px), mode="area") + 1) / 2).clamp(0, 1)
            for size, px in SIZES.items()
        }  # size -> (N, 1, px, px) ink in [0, 1]
        self.by_digit = [torch.nonzero(digits.labels == d).squeeze(1) for d in range(10)]

    def render(self, scene: Scene, g: torch.Generator) -> torch.Tensor:
        """(1, CANVAS, CANVAS) in [-1, 1]: each digit a random glyph of it, jittered."""
        canvas = torch.zeros(1, CANVAS, CANVAS)
        for item in scene.items:
            size = item.size or "large"
            glyph = self.glyph(item.digit, size, g)  # (1, px, px)
            px = SIZES[size]
            (r0, r1), (c0, c1) = REGIONS[item.place]
            row, col = CENTRES[item.place]
            dy, dx = (torch.randint(-self.jitter, self.jitter + 1, (2,), generator=g)).tolist()
            top = min(max(row - px // 2 + dy, r0), r1 - px)
            left = min(max(col - px // 2 + dx, c0), c1 - px)
            patch = canvas[:, top : top + px, left : left + px]
            canvas[:, top : top + px, left : left + px] = torch.maximum(patch, glyph)
        return canvas * 2 - 1

    def glyph(self, digit: int, size: str, g: torch.Generator) -> torch.Tensor:
        """(1, px, px) ink in [0, 1]: a random glyph of ``digit`` at ``size``."""
        candidates = self.by_digit[digit]
        return self.glyphs[size][candidates[pick(g, len(candidates))]]

    def batch(
        self, n: int, g: torch.Generator, wordings: Sequence[Wording] = TRAIN
    ) -> tuple[torch.Tensor, list[str]]:
        """n training scenes (none with a held-out combination): images (n, 1, S, S), captions."""
        scenes = [random_scene(g) for _ in range(n)]
        images = torch.stack([self.render(s, g) for s in scenes])
        return images, [caption(s, wordings, g) for s in scenes]


def corpus() -> Iterator[str]:
    """Every caption training can produce (what the tokenizer is trained on): each training
    wording over every scene it fits, sizes and digits all."""
    sizes = list(SIZES)
    for wording in TRAIN:
        for places in [(p,) for p in PLACES] + list(PAIRS):
            for digits in range(10 ** len(places)):
                ds = [digits // 10 ** (len(places) - 1 - i) % 10 for i in range(len(places))]
                for size_pick in range(len(sizes) ** len(places)):
                    ss = [
                        sizes[size_pick // len(sizes) ** i % len(sizes)] for i in range(len(places))
                    ]
                    scene = Scene(
                        tuple(Item(d, p, s) for d, p, s in zip(ds, places, ss, strict=True))
                    )
                    if wording.fits(scene) and not scene.held_out_combo:
                        yield wording.caption(scene)


def held_out_prompts(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` evaluation prompts, each held out of training in one way or both: the first half
    in a held-out wording (any combination), the rest stating a held-out (digit, place)
    combination (in any wording, held out or not)."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for i in range(n):
        if i < n // 2:
            prompts.append(caption(random_scene(g, held_out=None), HELD_OUT, g))
        else:
            prompts.append(caption(random_scene(g, held_out=True), (*TRAIN, *HELD_OUT), g))
    return prompts
