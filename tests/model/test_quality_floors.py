"""Quality floors on the shipped models: every (model, setting) the bench reports, run on a small
seeded sample and held to its row of ``model.training.floors`` (PSNR against the uncached images of
the same seeds, class accuracy, the share of steps cached). This is where a wrong cache fails: on a
trained network, not on a random one."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from model import registry
from model.sampling.pipeline import Pipeline
from model.training.bench import Judge, Workload, floor_workload, model_settings, sample
from model.training.floors import (
    ACCURACY_MARGIN,
    FLOORS,
    SAMPLES,
    Floor,
    Measured,
    floor,
    table,
    uncached_row,
    violations,
)
from model.training.options import BenchOptions

pytestmark = pytest.mark.slow  # every shipped model sampled at its floors' settings

BENCH = Path(__file__).parents[2] / "docs" / "bench"


class Sampled(NamedTuple):
    pipeline: Pipeline
    workload: Workload  # the model's floor sample (floors.SAMPLES)
    settings: dict[str, tuple[str, dict]]  # bench label -> (policy, options)
    reference: torch.Tensor  # uncached images of the sample (a DyDiT: its base model's)
    judge: Judge
    uncached: Measured  # the sample of the model's first row (uncached; a DyDiT: routed)


def measure(model: Sampled, setting: str) -> Measured:
    policy, options = model.settings[setting]
    return sample(model.pipeline, model.workload, policy, options, model.reference)[0]


@pytest.fixture(scope="module")
def sampled():
    """Per model, loaded and sampled uncached once."""
    done: dict[str, Sampled] = {}
    judge = Judge.load()

    def get(name: str) -> Sampled:
        if name not in done:
            loaded = registry.load(name)
            work = floor_workload(loaded.info, SAMPLES[name], judge)
            chosen = model_settings(loaded.config, BenchOptions(), loaded.card)
            settings = {label: (policy, options) for label, policy, options in chosen}
            if loaded.config.dynamic:  # the reference is the base model's; its first row runs
                base = registry.load(loaded.card["from"]).pipeline
                reference = sample(base, work, "none", {})[1]
                model = Sampled(loaded.pipeline, work, settings, reference, judge, None)
                first = measure(model, uncached_row(name).setting)
            else:  # its first row, uncached, is the reference
                first, reference = sample(loaded.pipeline, work, "none", {})
            done[name] = Sampled(loaded.pipeline, work, settings, reference, judge, first)
        return done[name]

    return get


@pytest.mark.parametrize("row", FLOORS, ids=[f"{f.model}:{f.setting}" for f in FLOORS])
def test_quality_floor(row: Floor, sampled) -> None:
    model = sampled(row.model)
    first = row == uncached_row(row.model)
    got = model.uncached if first else measure(model, row.setting)
    assert violations(row, got, model.uncached) == [], (row, got)


def test_every_bench_setting_of_every_shipped_model_has_a_floor() -> None:
    assert set(SAMPLES) == set(registry.shipped_models())
    expected = set()
    for name in registry.shipped_models():
        info = registry.describe(name)
        chosen = model_settings(info.config, BenchOptions(), info.card)
        expected |= {(name, label) for label, _, _ in chosen}
    assert {(f.model, f.setting) for f in FLOORS} == expected
    assert len(FLOORS) == len(expected)  # no row twice


def test_the_floors_are_the_committed_bench_figures() -> None:
    """A bench re-run that moves a figure fails here until the table is updated with it."""
    committed = {}
    for path in (
        BENCH / "results.json",
        BENCH / "video" / "results.json",
        BENCH / "t2i" / "results.json",
        BENCH / "t2v" / "results.json",
    ):
        for r in json.loads(path.read_text()):
            committed[r["model"], r["label"]] = (r["psnr"], r["accuracy"], r["steps_cached"])
    for f in FLOORS:
        psnr, acc, cached = committed[f.model, f.setting]
        assert (round(psnr, 1) if math.isfinite(psnr) else psnr) == f.psnr, f
        assert (round(acc, 3), round(cached, 2)) == (f.accuracy, f.cached), f
    assert len(committed) == len(FLOORS)


def test_the_table_gives_each_measured_row_its_verdict() -> None:
    row = floor("digits-skip-dit", "fora N=4")
    uncached = uncached_row("digits-skip-dit")
    at_floor = Measured(row.psnr_floor, row.accuracy, row.cached_floor)
    below = Measured(row.psnr_floor - 0.1, 0.5, row.cached_floor - 0.05)
    reference = Measured(math.inf, uncached.accuracy, 0.0)
    for measured, verdict in ((at_floor, "ok"), (below, "BELOW: PSNR")):
        lines = table(
            {(row.model, uncached.setting): reference, (row.model, row.setting): measured}
        )
        (line,) = [ln for ln in lines if f"| {row.setting} |" in ln]
        assert line.split(" | ")[-1].startswith(verdict), line
    assert violations(row, below, reference) == [
        f"PSNR {below.psnr:.1f} dB < floor {row.psnr_floor:.1f}",
        f"accuracy 50.0% < {uncached.accuracy - ACCURACY_MARGIN:.1%}",
        f"cached {below.cached:.0%} of steps < floor {row.cached_floor:.0%}",
    ]
    assert table({("not-shipped", "none"): reference}) == []
