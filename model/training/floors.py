"""Quality floors: what each cache setting must keep on each shipped model, from the bench.

A tiny random network cannot tell a right cache from a broken one (a swapped or stale FORA moves
its output less than a change of class does); the shipped trained models can. Each row holds
the committed bench's figures for one (model, setting): PSNR against the same model's uncached
images (a DyDiT's: its base model's), class accuracy, and the share of steps that ran cached.
Three readers share this one table:

- ``tests/model/test_quality_floors.py`` runs a small seeded sample of every row (``SAMPLES``)
  and holds it to the row's floors: PSNR at least the bench's minus ``PSNR_MARGIN_DB``,
  accuracy at least the sample's own uncached accuracy minus the row's accuracy margin, and
  at least the bench's cached share minus ``CACHED_MARGIN`` of its steps cached (a "cache" that
  stopped caching keeps its quality: this floor catches it);
- ``skipdit bench`` prints the table beside what it measured, with a verdict per row;
- a test compares the table with the committed ``docs/bench`` results, so a bench re-run that
  moves a figure fails until the table is updated with it.

The margins leave room for a 10-image (video: 4-clip) sample of a 100-image (20-clip) figure
(on this machine the samples landed from 0.9 dB below to 1.7 dB above the bench's figure) and
for another machine's rounding.
The broken policies of ``tests/mutants.py`` fall far below, on digits-skip-dit's samples at
N=4: FORA with swapped branches 7.0 dB, reading its neighbour's store 7.2 dB, never refreshing
16.9 dB (floor 30.2); Skip-Cache with the wrong deep feature 11.8 dB (floor 27.6); fbcache with
a stale residual (th=0.05) 15.9 dB (floor 26.9); TeaCache that never resets its sum keeps its
quality but caches 8% of the steps at th=0.05 (floor 62%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PSNR_MARGIN_DB = 3.0
ACCURACY_MARGIN = 0.15  # plus what the bench itself measured below uncached for that row
CACHED_MARGIN = 0.1  # share of steps


@dataclass(frozen=True)
class Sample:
    """The small seeded run a model's floors are checked on (``model.training.bench.requests``)."""

    classes: int  # class labels 0..classes-1, one request each
    per_class: int
    steps: int  # DDIM
    seed: int = 0  # class c: seed + c, as the bench


# The bench's own runs: images 10 per class at DDIM 50; video 2 clips per class at DDIM 25;
# text 200 held-out prompts at flow_euler 25, text-to-video 16 held-out motion prompts (a clip
# each) at flow_euler 25.
SAMPLES: dict[str, Sample] = {
    "digits-dit": Sample(classes=10, per_class=1, steps=50),
    "digits-skip-dit": Sample(classes=10, per_class=1, steps=50),
    "digits-skip-dydit": Sample(classes=10, per_class=1, steps=50),
    "digits-video-skip": Sample(classes=4, per_class=1, steps=25),
    "digits-t2i-skip": Sample(classes=10, per_class=1, steps=25),  # the first 10 held-out prompts
    "digits-t2v-skip": Sample(classes=2, per_class=1, steps=25),  # the first 2 motion prompts
}


@dataclass(frozen=True)
class Floor:
    """One bench row: ``setting`` is its label (``model.training.bench.settings``)."""

    model: str
    setting: str
    psnr: float  # dB against the uncached images of the same seeds; inf for uncached itself
    accuracy: float  # class accuracy (video: of every frame)
    cached: float  # share of steps that ran cached

    @property
    def psnr_floor(self) -> float:
        return self.psnr - PSNR_MARGIN_DB

    def accuracy_margin(self, uncached: float) -> float:
        """ACCURACY_MARGIN, plus what the bench measured below ``uncached`` (the bench's)."""
        return ACCURACY_MARGIN + max(0.0, uncached - self.accuracy)

    @property
    def cached_floor(self) -> float:
        return max(0.0, self.cached - CACHED_MARGIN)


@dataclass(frozen=True)
class Measured:
    psnr: float
    accuracy: float
    cached: float


INF = math.inf
FLOORS: tuple[Floor, ...] = (
    Floor("digits-dit", "none", INF, 0.980, 0.00),
    Floor("digits-dit", "skip_cache N=2", 32.6, 0.990, 0.48),
    Floor("digits-dit", "skip_cache N=3", 29.6, 0.990, 0.64),
    Floor("digits-dit", "skip_cache N=4", 28.6, 0.990, 0.72),
    Floor("digits-dit", "fora N=2", 34.1, 0.980, 0.50),
    Floor("digits-dit", "fora N=3", 30.8, 0.990, 0.66),
    Floor("digits-dit", "fora N=4", 29.8, 0.990, 0.74),
    Floor("digits-dit", "delta_dit N=2", 41.7, 0.980, 0.50),
    Floor("digits-dit", "delta_dit N=3", 37.1, 0.980, 0.66),
    Floor("digits-dit", "delta_dit N=4", 33.9, 0.980, 0.74),
    Floor("digits-dit", "toca N=2 r=0.25", 35.6, 0.980, 0.50),
    Floor("digits-dit", "toca N=3 r=0.25", 33.2, 0.990, 0.66),
    Floor("digits-dit", "toca N=4 r=0.25", 32.3, 0.990, 0.74),
    Floor("digits-dit", "fbcache th=0.05", 30.1, 0.990, 0.58),
    Floor("digits-dit", "fbcache th=0.1", 28.9, 0.990, 0.74),
    Floor("digits-dit", "fbcache th=0.2", 27.6, 0.990, 0.84),
    Floor("digits-dit", "teacache th=0.02", 33.4, 0.990, 0.47),
    Floor("digits-dit", "teacache th=0.03", 31.0, 0.990, 0.61),
    Floor("digits-dit", "teacache th=0.05", 28.5, 0.990, 0.74),
    Floor("digits-dit", "skip_cache N=4 th=0.02", 35.6, 0.980, 0.15),
    Floor("digits-dit", "skip_cache N=4 th=0.05", 31.0, 0.990, 0.48),
    Floor("digits-dit", "skip_cache N=4 th=0.1", 29.0, 0.990, 0.66),
    Floor("digits-skip-dit", "none", INF, 0.980, 0.00),
    Floor("digits-skip-dit", "skip_cache N=2", 37.3, 1.000, 0.48),
    Floor("digits-skip-dit", "skip_cache N=3", 33.1, 1.000, 0.64),
    Floor("digits-skip-dit", "skip_cache N=4", 30.6, 1.000, 0.72),
    Floor("digits-skip-dit", "fora N=2", 40.0, 0.990, 0.50),
    Floor("digits-skip-dit", "fora N=3", 35.8, 1.000, 0.66),
    Floor("digits-skip-dit", "fora N=4", 33.2, 1.000, 0.74),
    Floor("digits-skip-dit", "delta_dit N=2", 38.3, 0.990, 0.50),
    Floor("digits-skip-dit", "delta_dit N=3", 34.8, 1.000, 0.66),
    Floor("digits-skip-dit", "delta_dit N=4", 31.8, 1.000, 0.74),
    Floor("digits-skip-dit", "toca N=2 r=0.25", 41.5, 0.990, 0.50),
    Floor("digits-skip-dit", "toca N=3 r=0.25", 38.6, 1.000, 0.66),
    Floor("digits-skip-dit", "toca N=4 r=0.25", 36.9, 1.000, 0.74),
    Floor("digits-skip-dit", "fbcache th=0.05", 29.9, 1.000, 0.76),
    Floor("digits-skip-dit", "fbcache th=0.1", 23.7, 0.930, 0.84),
    Floor("digits-skip-dit", "fbcache th=0.2", 16.0, 0.750, 0.90),
    Floor("digits-skip-dit", "teacache th=0.02", 35.8, 1.000, 0.48),
    Floor("digits-skip-dit", "teacache th=0.03", 32.1, 1.000, 0.61),
    Floor("digits-skip-dit", "teacache th=0.05", 29.5, 1.000, 0.72),
    Floor("digits-skip-dit", "skip_cache N=4 th=0.02", 34.5, 1.000, 0.47),
    Floor("digits-skip-dit", "skip_cache N=4 th=0.05", 31.5, 1.000, 0.64),
    Floor("digits-skip-dit", "skip_cache N=4 th=0.1", 30.9, 1.000, 0.70),
    Floor("digits-skip-dydit", "dydit λ=0.5", 28.2, 0.980, 0.00),
    Floor("digits-skip-dydit", "dydit λ=0.5 + skip_cache N=2", 28.3, 0.980, 0.48),
    Floor("digits-skip-dydit", "dydit λ=0.5 + skip_cache N=3", 27.9, 0.990, 0.64),
    Floor("digits-skip-dydit", "dydit λ=0.5 + skip_cache N=4", 27.2, 0.990, 0.72),
    Floor("digits-video-skip", "none", INF, 0.925, 0.00),
    Floor("digits-video-skip", "skip_cache N=2", 28.1, 0.962, 0.40),
    Floor("digits-video-skip", "skip_cache N=3", 23.8, 0.981, 0.56),
    Floor("digits-video-skip", "skip_cache N=4", 21.7, 0.981, 0.64),
    Floor("digits-video-skip", "fora N=2", 28.0, 0.969, 0.48),
    Floor("digits-video-skip", "fora N=3", 23.8, 0.981, 0.64),
    Floor("digits-video-skip", "fora N=4", 21.5, 0.981, 0.72),
    Floor("digits-video-skip", "delta_dit N=2", 30.0, 0.969, 0.48),
    Floor("digits-video-skip", "delta_dit N=3", 25.9, 0.975, 0.64),
    Floor("digits-video-skip", "delta_dit N=4", 23.8, 0.975, 0.72),
    Floor("digits-video-skip", "fbcache th=0.05", 23.8, 0.994, 0.64),
    Floor("digits-video-skip", "fbcache th=0.1", 21.2, 0.975, 0.76),
    Floor("digits-video-skip", "fbcache th=0.2", 16.2, 0.881, 0.84),
    Floor("digits-video-skip", "teacache th=0.02", 38.2, 0.938, 0.13),
    Floor("digits-video-skip", "teacache th=0.03", 29.2, 0.975, 0.33),
    Floor("digits-video-skip", "teacache th=0.05", 26.4, 0.981, 0.43),
    Floor("digits-video-skip", "skip_cache N=4 th=0.02", 34.4, 0.950, 0.25),
    Floor("digits-video-skip", "skip_cache N=4 th=0.05", 24.3, 0.981, 0.52),
    Floor("digits-video-skip", "skip_cache N=4 th=0.1", 21.7, 0.981, 0.64),
    Floor("digits-t2i-skip", "none", INF, 0.815, 0.00),
    Floor("digits-t2i-skip", "skip_cache N=2", 32.4, 0.810, 0.48),
    Floor("digits-t2i-skip", "skip_cache N=3", 26.2, 0.815, 0.64),
    Floor("digits-t2i-skip", "skip_cache N=4", 22.0, 0.805, 0.72),
    Floor("digits-t2i-skip", "fora N=2", 32.0, 0.825, 0.48),
    Floor("digits-t2i-skip", "delta_dit N=2", 31.9, 0.820, 0.48),
    Floor("digits-t2i-skip", "toca N=2 r=0.25", 32.5, 0.815, 0.48),
    Floor("digits-t2i-skip", "fbcache th=0.08", 31.7, 0.810, 0.48),
    Floor("digits-t2i-skip", "teacache th=0.05", 20.5, 0.755, 0.21),
    Floor("digits-t2i-skip", "skip_cache N=4 th=0.05", 40.1, 0.815, 0.31),
    Floor("digits-t2v-skip", "none", INF, 0.977, 0.00),
    Floor("digits-t2v-skip", "skip_cache N=2", 46.8, 0.977, 0.28),
    Floor("digits-t2v-skip", "skip_cache N=3", 41.1, 0.977, 0.40),
    Floor("digits-t2v-skip", "skip_cache N=4", 37.5, 0.953, 0.44),
    Floor("digits-t2v-skip", "fora N=2", 34.1, 0.961, 0.48),
    Floor("digits-t2v-skip", "delta_dit N=2", 33.7, 0.961, 0.48),
    Floor("digits-t2v-skip", "fbcache th=0.08", 29.9, 0.984, 0.60),
    Floor("digits-t2v-skip", "teacache th=0.05", 15.7, 0.391, 0.76),
    Floor("digits-t2v-skip", "skip_cache N=4 th=0.05", 44.5, 0.977, 0.28),
)


def floor(model: str, setting: str) -> Floor:
    return next(f for f in FLOORS if (f.model, f.setting) == (model, setting))


def uncached_row(model: str) -> Floor:
    """The model's first row, its uncached run (a DyDiT: routed, uncached), as in the bench."""
    return next(f for f in FLOORS if f.model == model)


def violations(row: Floor, measured: Measured, uncached: Measured | None) -> list[str]:
    """What ``measured`` (a run of ``row``'s setting) falls short of. ``uncached``: the same
    sample's uncached run, whose accuracy the row's is held to (for the uncached row itself, or
    without one, the bench's figure in this table)."""
    first = uncached_row(row.model)
    baseline = uncached.accuracy if uncached is not None and row != first else first.accuracy
    out = []
    if math.isfinite(row.psnr) and not measured.psnr >= row.psnr_floor:
        out.append(f"PSNR {measured.psnr:.1f} dB < floor {row.psnr_floor:.1f}")
    margin = row.accuracy_margin(first.accuracy)
    if measured.accuracy < baseline - margin:
        out.append(f"accuracy {measured.accuracy:.1%} < {baseline - margin:.1%}")
    if measured.cached < row.cached_floor:
        out.append(f"cached {measured.cached:.0%} of steps < floor {row.cached_floor:.0%}")
    return out


def table(measured: dict[tuple[str, str], Measured] | None = None) -> list[str]:
    """The floors as markdown; given ``measured``, only its rows, each with its figures and a
    verdict (nothing when none of them has a floor: a model that is not shipped)."""
    if measured is not None and not any((f.model, f.setting) in measured for f in FLOORS):
        return []
    lines = [
        f"Floors (model.training.floors; margins: PSNR {PSNR_MARGIN_DB} dB, accuracy "
        f"{ACCURACY_MARGIN:.0%} + the bench's own loss, cached share {CACHED_MARGIN:.0%}):",
        "",
        "| model | setting | bench PSNR | PSNR floor | accuracy margin | cached floor "
        "| measured PSNR | measured accuracy | measured cached | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in FLOORS:
        first = uncached_row(row.model)
        got = (measured or {}).get((row.model, row.setting))
        if measured is not None and got is None:
            continue
        cells = ["-", "-", "-", "-"]
        if got is not None:
            assert measured is not None  # got is one of its rows
            bad = violations(row, got, measured.get((row.model, first.setting)))
            cells = [f"{got.psnr:.1f}", f"{got.accuracy:.1%}", f"{got.cached:.0%}",
                     "BELOW: " + "; ".join(bad) if bad else "ok"]  # fmt: skip
        margin = row.accuracy_margin(first.accuracy)
        lines.append(
            f"| {row.model} | {row.setting} | {row.psnr:.1f} | {row.psnr_floor:.1f} | "
            f"{margin:.0%} | {row.cached_floor:.0%} | {' | '.join(cells)} |"
        )
    return lines
