"""``skipdit calibrate-teacache``: fit TeaCache's rescaling polynomial for a model and store it in
the model's card.

TeaCache (``model.cache.teacache``) estimates how much a step would change the model's output
from how much block 0's modulated input changed; the relation is model-specific. For each model
this runs seeded, uncached requests (``per_class`` images of every class, class c seeded
``seed + c``, DDIM ``steps``, the card's guidance: as the model is served) and records, per
request and step, the relative L1 change since the request's previous step (``mean|now - prev|
/ mean|prev|`` over the request's rows, conditional and unconditional together, as TeaCache
measures a request) of
- x: block 0's modulated input (``SkipDiT.modulated_input``, what TeaCache watches), and
- y: the model output (the network's prediction, every output channel): what a skipped step
  gets wrong and what the sampler consumes. This is the official calibration's target too
  (TeaCache fits the model output's change, not the block stack's residual's).
``np.polyfit(x, y, 4)`` over every step of every run gives the coefficients (highest power
first). They are written to ``card["teacache"]`` of the model's ``config.json`` with the command
and the runs that made them; nothing else in the file changes, the weights are not touched.

Deterministic: seeded noise, fixed request order, one batched forward per step, so the same
command on the same machine reproduces the stored coefficients bit for bit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import registry
from model.networks.checkpoint import CONFIG_FILE
from model.networks.conditions import Condition
from model.networks.skip_dit import SkipDiT
from model.sampling.graphs import Cached
from model.sampling.pipeline import Pipeline, denoise_step
from model.sampling.plan import RunPlan
from model.training import motion, scenes
from model.training.options import CalibrateOptions

log = logging.getLogger(__name__)

DEGREE = 4  # TeaCache's polynomial
SAMPLER = "ddim"
TEXT_PROMPTS = 10  # text models: training captions calibrated on


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    return ((now - before).abs().mean() / before.abs().mean().clamp_min(1e-12)).item()


@torch.inference_mode()
def trace(pipeline: Pipeline, requests: Sequence[RunPlan]) -> list[tuple[float, float]]:
    """(input change, output change) of every request at every step after its first, from one
    uncached run of all the requests batched (they must share a step count)."""
    started = [pipeline.start(p) for p in requests]
    previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    points: list[tuple[float, float]] = []

    def forward(
        model: SkipDiT,
        jobs: Sequence[Cached],
        full: bool,
        x: torch.Tensor,
        t: torch.Tensor,
        y: Condition,
    ) -> tuple[torch.Tensor, dict[Hashable, torch.Tensor]]:
        out, captured = model.capturing(x, t, y, {"modulated"})  # (rows, C_out, H, W), {(rows,..)}
        offset = 0
        for job in jobs:
            rows = slice(offset, offset + job.rows)
            offset = rows.stop
            now = (captured["modulated"][rows], out[rows])
            if id(job) in previous:
                before = previous[id(job)]
                points.append((relative_l1(now[0], before[0]), relative_l1(now[1], before[1])))
            previous[id(job)] = now
        return out, {}

    while not all(job.done for job in started):
        denoise_step(pipeline.model, started, forward)
    return points


def calibration_requests(
    pipeline: Pipeline, opts: CalibrateOptions, classes: int, kind: str = "image"
) -> list[RunPlan]:
    """Class models: ``per_class`` images of each class (class c seeded ``seed + c``), DDIM.
    Text models: ``classes`` training captions (caption i seeded ``seed + i``), ``per_class``
    images each, the model's own sampler: of scenes (``model.training.scenes``), or of digits
    in motion (``model.training.motion``) for a video model (``kind``)."""
    if pipeline.prompting is None:
        return [
            pipeline.plan(
                class_label=c,
                num_images=opts.per_class,
                steps=opts.steps,
                sampler=SAMPLER,
                seed=opts.seed + c,
            )
            for c in range(classes)
        ]
    g = torch.Generator().manual_seed(opts.seed)
    if kind == "video":
        prompts = [motion.caption(motion.random_clip(g), motion.TRAIN, g) for _ in range(classes)]
    else:
        prompts = [scenes.caption(scenes.random_scene(g), scenes.TRAIN, g) for _ in range(classes)]
    return [
        pipeline.plan(prompt=p, num_images=opts.per_class, steps=opts.steps, seed=opts.seed + i)
        for i, p in enumerate(prompts)
    ]


def fit(points: Sequence[tuple[float, float]]) -> list[float]:
    """``np.polyfit`` of output change against input change, highest power first."""
    x, y = np.array(points, dtype=np.float64).T
    return [float(c) for c in np.polyfit(x, y, DEGREE)]


def calibrate_model(name: str, opts: CalibrateOptions) -> dict[str, Any]:
    """The ``card["teacache"]`` entry of one model: its coefficients and how they were made."""
    loaded = registry.load(name)
    config = loaded.config
    text = loaded.info.conditioning == "text"
    runs = TEXT_PROMPTS if text else config.num_classes
    requests = calibration_requests(loaded.pipeline, opts, runs, loaded.info.kind)
    points = trace(loaded.pipeline, requests)
    inputs = [x for x, _ in points]
    return {
        "coefficients": fit(points),
        "command": opts.command_line,
        "fit": f"np.polyfit(x, y, {DEGREE}): x = relative L1 change of block 0's modulated "
        "input, y = of the model output, per request and step",
        "runs": {
            ("prompts" if text else "classes"): runs,
            "per_class": opts.per_class,
            "seed": opts.seed,  # class (prompt) i: seed + i
            "sampler": requests[0].sampler,
            "steps": opts.steps,
            "guidance": requests[0].guidance,
            "points": len(points),
            "input_range": [min(inputs), max(inputs)],
        },
    }


def write_card_entry(directory: Path, entry: dict[str, Any]) -> None:
    """Set ``card["teacache"]`` in the directory's config.json; every other byte's meaning
    stays (same key order, same indentation as ``checkpoint.save_pretrained``)."""
    path = directory / CONFIG_FILE
    meta = json.loads(path.read_text())
    meta.setdefault("card", {})["teacache"] = entry
    path.write_text(json.dumps(meta, indent=2) + "\n")


def default_models() -> list[str]:
    """Every shipped model (image and video)."""
    return registry.shipped_models()


def calibrate(opts: CalibrateOptions) -> dict[str, dict[str, Any]]:
    """Calibrate every model of ``opts`` (default: every shipped model); writes each
    model's card unless ``dry_run``. Returns model name -> its card entry."""
    entries = {}
    for name in opts.models or default_models():
        directory = registry.directory(name)  # before the runs: a preset or .pt has no card
        entries[name] = entry = calibrate_model(name, opts)
        log.info("%s: coefficients %s", name, entry["coefficients"])
        if not opts.dry_run:
            write_card_entry(directory, entry)
    return entries
