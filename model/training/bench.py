"""``skipdit bench``: every cache policy at several settings on the shipped models, in one run.

For each model and each (policy, setting): wall-clock speedup against the uncached run of the
same batch timed right after it (a shared machine drifts by 10-30% over minutes; adjacent pairs
cancel most of that; the median over ``--repeats`` pairs), FLOP ratio (counted with torch's
FlopCounterMode over a real run, not a formula: the two differ because cached steps keep fixed
costs), cache memory per image, PSNR and SSIM against the uncached images of the same seeds,
class accuracy of the shipped classifier and FID on its features against held-out real digits.
Video models: the policies that apply to video, PSNR/SSIM over all frames, per-frame accuracy
(``model.training.evaluate.frame_accuracy``) and temporal consistency (mean frame-to-frame change,
against real moving-digit clips) in place of FID.
Writes ``results.md`` (tables), ``speedup_vs_psnr.png``, ``grid.png`` (same seeds across
settings; video: ``strip_<setting>.gif``, the first clip of each class) and, given training
runs, ``training.png`` (loss and FID against training step for Skip-DiT and its DiT twin).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import numpy as np
import torch
from safetensors.torch import load_file

from model import registry
from model.cache import POLICIES, Mode
from model.networks.checkpoint import load_state, read_pretrained_meta
from model.networks.flops import count as count_flops
from model.networks.skip_dit import DiTConfig, SkipDiT
from model.sampling.images import animate, grid, to_pil
from model.sampling.pipeline import Job, Pipeline, Result
from model.sampling.plan import RunPlan
from model.training import adherence, data, motion, scenes
from model.training.evaluate import (
    DigitClassifier,
    accuracy,
    features,
    frame_accuracy,
    frechet_distance,
    load_classifier,
    psnr_ssim,
    temporal_difference,
)
from model.training.floors import Measured, Sample
from model.training.floors import table as floor_table
from model.training.options import BenchOptions

log = logging.getLogger(__name__)


@dataclass
class Row:
    model: str
    label: str  # e.g. "skip_cache N=3"
    policy: str
    speedup: float
    flop_ratio: float
    cache_bytes_per_image: float
    psnr: float
    ssim: float
    accuracy: float  # video: of every frame
    fid: float | None  # images only
    steps_cached: float  # mean fraction of steps cached
    temporal: float | None = None  # video only: mean frame-to-frame change
    motion: float | None = None  # text-to-video only: share of clips moving as stated


def settings(
    intervals: list[int], thresholds: list[float], model: DiTConfig
) -> list[tuple[str, str, dict]]:
    """(label, policy, parameters by the policy's names) of every setting of the policies that
    apply to the model."""
    out: list[tuple[str, str, dict]] = [("none", "none", {})]
    for policy in ("skip_cache", "fora", "delta_dit"):
        out += [(f"{policy} N={n}", policy, {"interval": n}) for n in intervals]
    out += [(f"toca N={n} r=0.25", "toca", {"interval": n, "ratio": 0.25})
            for n in intervals]  # fmt: skip
    out += [(f"fbcache th={t}", "fbcache", {"threshold": t}) for t in thresholds]
    # TeaCache on the card's polynomial: on the shipped digit models (DDIM 50) these skip about
    # 45%, 60% and 70% of the steps, near Skip-Cache N=2, 3 and 4.
    out += [(f"teacache th={t}", "teacache", {"threshold": t}) for t in (0.02, 0.03, 0.05)]
    # Adaptive Skip-Cache: N=4 bounds the gap between full steps, the threshold refreshes
    # requests whose shallow output moved in between (on digits-skip-dit, DDIM 50, the median
    # change over 1, 2, 3 steps is 0.011, 0.019, 0.025; its 90th percentile 0.04, 0.07, 0.10).
    out += [(f"skip_cache N=4 th={t}", "skip_cache", {"interval": 4, "threshold": t})
            for t in (0.02, 0.05, 0.1)]  # fmt: skip
    return [s for s in out if POLICIES[s[1]].applies_to(model)]


def dydit_settings(intervals: list[int], card: dict) -> list[tuple[str, str, dict]]:
    """A DyDiT model's settings: routed alone, and routed with Skip-Cache at each interval."""
    label = f"dydit λ={card.get('dydit', {}).get('flops_ratio', '?')}"
    cached = [(f"{label} + skip_cache N={n}", "skip_cache", {"interval": n})
              for n in intervals]  # fmt: skip
    return [(label, "none", {}), *cached]


def text_settings(intervals: list[int]) -> list[tuple[str, str, dict]]:
    """A text model's settings: each run is 200 prompts, so every policy once at the setting
    nearest Skip-Cache N=2 (the peers' defaults: fbcache's threshold, TeaCache at its ~N=3
    threshold), Skip-Cache at every interval and adaptive at N=4."""
    return [
        ("none", "none", {}),
        *[(f"skip_cache N={n}", "skip_cache", {"interval": n}) for n in intervals],
        ("fora N=2", "fora", {"interval": 2}),
        ("delta_dit N=2", "delta_dit", {"interval": 2}),
        ("toca N=2 r=0.25", "toca", {"interval": 2, "ratio": 0.25}),
        ("fbcache th=0.08", "fbcache", {"threshold": 0.08}),
        ("teacache th=0.05", "teacache", {"threshold": 0.05}),
        ("skip_cache N=4 th=0.05", "skip_cache", {"interval": 4, "threshold": 0.05}),
    ]


def model_settings(
    config: DiTConfig, opts: BenchOptions, card: dict | None = None
) -> list[tuple[str, str, dict]]:
    """The settings the bench runs on a model: a DyDiT's own (its card's lambda), a text
    model's (``text_settings``), or every policy's that applies."""
    if config.dynamic:
        return dydit_settings(opts.intervals, card or {})
    if config.conditioning == "text":
        return [s for s in text_settings(opts.intervals) if POLICIES[s[1]].applies_to(config)]
    return settings(opts.intervals, opts.thresholds, config)


def requests(
    pipeline: Pipeline,
    policy: str,
    params: dict,
    per_class: int,
    steps: int,
    seed: int,
    classes: int,
) -> list[RunPlan]:
    """One plan per class for ``pipeline``'s model (class c seeded ``seed + c``), guidance from
    its card."""
    return [
        pipeline.plan(
            class_label=c,
            num_images=per_class,
            steps=steps,
            seed=seed + c,
            policy=policy,
            params=params,
        )
        for c in range(classes)
    ]


def images_of(results: list[Result]) -> torch.Tensor:
    """The results' images in request order: (n, H, W, 1); clips (n, F, H, W, 1)."""
    return torch.cat([cast(torch.Tensor, r.images) for r in results])  # none cancelled


def cached_share(results: list[Result]) -> float:
    """Share of the results' steps that ran cached."""
    steps = [r.stats.steps for r in results]
    return sum(s[Mode.CACHED] for s in steps) / sum(s[Mode.CACHED] + s[Mode.FULL] for s in steps)


def sample(
    pipeline: Pipeline,
    workload: Workload,
    policy: str,
    params: dict,
    reference: torch.Tensor | None = None,
) -> tuple[Measured, torch.Tensor]:
    """One untimed run of the workload's requests at a setting, judged as a floor row is
    (``model.training.floors``): PSNR against ``reference`` (the uncached images of the same
    requests; None: this run is that reference, PSNR inf), accuracy (text: adherence), share
    cached; and the run's images."""
    results = pipeline.generate(workload.batch(pipeline, policy, params))
    images = images_of(results)
    psnr = math.inf
    if reference is not None:
        psnr = psnr_ssim(images.flatten(0, -4), reference.flatten(0, -4))[0]
    accuracy = workload.score(images)["accuracy"]
    return Measured(psnr, accuracy, cached_share(results)), images


def floor_workload(info: registry.ModelInfo, sample: Sample, judge: Judge) -> Workload:
    """The small seeded run a model's floors are checked on (``floors.SAMPLES``): ``classes``
    classes x ``per_class`` images (DDIM ``steps``), or a text model's first ``classes``
    held-out prompts (flow ``steps``; a text-to-video model's: motion prompts, a clip each)."""
    opts = BenchOptions(
        per_class=sample.per_class,
        steps=sample.steps,
        seed=sample.seed,
        prompts=sample.classes,
        clip_prompts=sample.classes,
        text_steps=sample.steps,
    )
    if info.conditioning == "class":
        return class_workload(sample.classes, judge, opts)
    return workload_of(info, judge, opts)


def counted_flops(pipeline: Pipeline, params: RunPlan) -> float:
    """FLOPs of one request's whole run, counted op by op."""
    job = pipeline.start(params)

    def run() -> None:
        while not job.done:
            pipeline.step([job])

    return count_flops(run)


def timed_run(pipeline: Pipeline, batch: list[RunPlan]) -> tuple[Any, float, float]:
    """(results, wall seconds, peak cache bytes per image) for one batched run."""
    peak = 0.0

    def progress(job: Job, mode: Mode) -> None:
        nonlocal peak
        held = job.cache.policy.state_bytes(job.cache.state) / job.plan.num_images
        peak = max(peak, held)

    began = time.perf_counter()
    results = pipeline.generate(batch, progress=progress)
    return results, time.perf_counter() - began, peak


def _measure(
    pipeline: Pipeline,
    batch: list[RunPlan],
    uncached: list[RunPlan],
    repeats: int,
    baseline: Pipeline,
) -> tuple[list, float, float]:
    """(results, median wall speedup against the baseline's uncached run timed right after,
    peak cache bytes per image) for one setting; same seeds give the same images, only the
    time varies."""
    results, seconds, peak = timed_run(pipeline, batch)
    ratios = []
    for i in range(repeats):
        if i:
            seconds = timed_run(pipeline, batch)[1]
        is_baseline = batch[0].policy == "none" and pipeline is baseline
        base = seconds if is_baseline else timed_run(baseline, uncached)[1]
        ratios.append(base / seconds)
    return results, statistics.median(ratios), peak


@dataclass
class Workload:
    """What a model is benched on: its requests at a setting (``batch(pipeline, policy,
    params)``), how its images are judged, and which of them the grid shows."""

    batch: Callable[[Pipeline, str, dict], list[RunPlan]]
    score: Callable[[torch.Tensor], Scores]
    shown: slice  # the images of a setting the grid shows


def class_workload(classes: int, judge: Judge, opts: BenchOptions) -> Workload:
    """``opts.per_class`` images of every class (class c seeded ``seed + c``), judged by class
    accuracy and FID; the grid shows the first image of each class."""
    labels = torch.arange(classes).repeat_interleave(opts.per_class)
    return Workload(
        lambda p, policy, params: requests(
            p, policy, params, opts.per_class, opts.steps, opts.seed, classes
        ),
        lambda images: judge.score(images, labels),
        slice(None, None, opts.per_class),
    )


def text_workload(classifier: DigitClassifier, opts: BenchOptions) -> Workload:
    """The held-out prompts (``scenes.held_out_prompts``: wordings and (digit, place)
    combinations training never saw), one image each (prompt i seeded ``seed + i``), judged by
    prompt adherence (reported in the accuracy column); the grid shows the first 8 prompts."""
    prompts = scenes.held_out_prompts(opts.prompts, opts.seed)

    def score(images: torch.Tensor) -> Scores:
        judged = adherence.judge(classifier, prompts, images)
        return {"accuracy": adherence.adherence(judged), "fid": None}

    return Workload(_prompted(prompts, opts), score, slice(0, GRID_PROMPTS))


def text_video_workload(classifier: DigitClassifier, opts: BenchOptions) -> Workload:
    """A text-to-video model's: the held-out motion prompts (``motion.held_out_prompts``), one
    clip each, judged frame by frame (accuracy: the share of frames whose digit is the stated
    one) and by motion (the share of clips moving as stated); the strips show the first 8."""
    prompts = motion.held_out_prompts(opts.clip_prompts, opts.seed)

    def score(clips: torch.Tensor) -> Scores:
        judged = adherence.judge_clips(classifier, prompts, clips)
        return {
            "accuracy": adherence.frame_adherence(judged),
            "fid": None,
            "motion": adherence.motion_adherence(judged),
        }

    return Workload(_prompted(prompts, opts), score, slice(0, GRID_PROMPTS))


def _prompted(prompts: list[str], opts: BenchOptions) -> Callable[..., list[RunPlan]]:
    """A workload's batch: one plan per prompt (prompt i seeded ``seed + i``), flow_euler
    ``text_steps``."""

    def batch(pipeline: Pipeline, policy: str, params: dict) -> list[RunPlan]:
        return [
            pipeline.plan(
                prompt=prompt,
                steps=opts.text_steps,
                seed=opts.seed + i,
                policy=policy,
                params=params,
            )
            for i, prompt in enumerate(prompts)
        ]

    return batch


GRID_PROMPTS = 8


def bench_model(
    name: str,
    pipeline: Pipeline,
    workload: Workload,
    opts: BenchOptions,
    baseline: Pipeline | None = None,
    card: dict | None = None,
) -> tuple[list[Row], dict[str, torch.Tensor]]:
    """Every setting of the model against the uncached run of ``baseline`` (the model itself;
    a DyDiT's base model, whose own rows are the base's settings) on the same seeds: its
    images are the PSNR/SSIM reference, its FLOPs and wall time the speedups' denominators."""
    config = pipeline.model.config
    baseline = baseline or pipeline
    for warm in {id(p): p for p in (pipeline, baseline)}.values():
        warm.generate([dataclasses.replace(workload.batch(warm, "none", {})[0], steps=2)])
    rows, grids = [], {}
    uncached = workload.batch(baseline, "none", {})
    reference = images_of(baseline.generate(uncached))
    base_flops = counted_flops(baseline, uncached[0])
    for label, policy, options in model_settings(config, opts, card):
        batch = workload.batch(pipeline, policy, options)
        results, speedup, peak = _measure(pipeline, batch, uncached, opts.repeats, baseline)
        images = images_of(results)  # (n, H, W, 1); video (n, F, H, W, 1)
        flops = counted_flops(pipeline, batch[0])
        psnr, ssim = psnr_ssim(images.flatten(0, -4), reference.flatten(0, -4))
        rows.append(
            Row(
                model=name,
                label=label,
                policy=policy,
                speedup=speedup,
                flop_ratio=base_flops / flops,
                cache_bytes_per_image=peak,
                psnr=psnr,
                ssim=ssim,
                steps_cached=cached_share(results),
                **workload.score(images),
            )
        )
        grids[label] = images[workload.shown]
        log.info(
            "%s %s: %.2fx, PSNR %.1f, accuracy %.1f%%",
            name, label, speedup, psnr, 100 * rows[-1].accuracy,
        )  # fmt: skip
    return rows, grids


class Scores(TypedDict):
    """``Judge.score``: the Row fields it fills."""

    accuracy: float
    fid: float | None  # images only
    temporal: NotRequired[float]  # clips only
    motion: NotRequired[float]  # clips of a text-to-video model only


@dataclass
class Judge:
    """The shipped classifier and the features of held-out real digits, for accuracy and FID."""

    classifier: DigitClassifier
    real_features: Any  # (n, 128)

    @classmethod
    def load(cls) -> Judge:
        classifier = load_classifier()
        real = data.load(classifier.source, classifier.size, "held_out")
        return cls(classifier, features(classifier, real.images))

    def fid(self, images: torch.Tensor) -> float:
        return frechet_distance(features(self.classifier, images), self.real_features)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Class accuracy of images (n, H, W, 1); of every frame of clips (n, F, H, W, 1)."""
        if images.ndim == 4:
            return accuracy(self.classifier, images, labels)
        return frame_accuracy(
            self.classifier, images, labels, data.clip_digit_size(images.shape[2])
        )

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> Scores:
        """accuracy and FID of images (n, H, W, 1); accuracy and temporal consistency of clips
        (n, F, H, W, 1)."""
        if images.ndim == 4:
            return {"accuracy": self.accuracy(images, labels), "fid": self.fid(images)}
        return {
            "accuracy": self.accuracy(images, labels),
            "fid": None,
            "temporal": temporal_difference(images),
        }


def training_curves(run_dirs: list[Path], opts: BenchOptions, judge: Judge) -> dict:
    """Loss and FID against training step, from each run's loss.csv and EMA snapshots."""
    curves = {}
    for run in run_dirs:
        config, card = read_pretrained_meta(run / "final")
        with (run / "loss.csv").open() as f:
            loss = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
        fids = []
        for snap in sorted((run / "snapshots").glob("step_*.safetensors")):
            model = load_state(SkipDiT(config), load_file(snap))
            pipeline = Pipeline(model, default_guidance=card.get("default_guidance", 2.0))
            batch = requests(pipeline, "none", {}, opts.per_class, opts.curve_steps, opts.seed, 10)
            images = images_of(pipeline.generate(batch))
            fids.append((int(snap.stem.split("_")[1]), judge.fid(images)))
        curves[card.get("architecture", run.name)] = {"loss": loss, "fid": fids}
    return curves


def _table(rows: list[Row], curves: dict, opts: BenchOptions) -> list[str]:
    lines = [
        "# Cache policies on the shipped digit models\n",
        f"`{opts.command_line}` — {opts.per_class} images (video models: clips) per class, DDIM "
        f"{opts.steps} steps, guidance from each model card, one batch per setting, wall speedup "
        f"against an uncached run timed right after (median of {opts.repeats} pair(s)), this "
        f"machine's CPU. Video models: PSNR/SSIM and accuracy over every frame (the classifier "
        f"sees the digit-sized window around each frame's ink), no FID; frame change is the "
        f"mean absolute change between consecutive frames. Text models: {opts.prompts} "
        f"held-out prompts, one image each, flow_euler {opts.text_steps} steps; their accuracy "
        f"is prompt adherence (every stated digit classified at its stated place). Text-to-video "
        f"models: {opts.clip_prompts} held-out motion prompts, one clip each; accuracy is the "
        f"share of frames showing the stated digit, motion the share of clips moving as "
        f"stated.\n",
        "| model | setting | speedup (wall) | FLOP ratio | cached steps | cache / image "
        "| PSNR dB | SSIM | accuracy | FID | frame change | motion |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r.model} | {r.label} | {r.speedup:.2f}x | {r.flop_ratio:.2f}x | "
            f"{r.steps_cached:.0%} | {r.cache_bytes_per_image / 1024:.0f} KiB | "
            f"{'inf' if r.psnr == float('inf') else f'{r.psnr:.1f}'} | {r.ssim:.3f} | "
            f"{r.accuracy:.1%} | {_num(r.fid, '.2f')} | {_num(r.temporal, '.3f')} | "
            f"{'-' if r.motion is None else f'{r.motion:.1%}'} |"
        )
    if len(curves) == 2 and all(c["fid"] for c in curves.values()):
        lines += ["", "## Training comparison", "", *_training_lines(curves)]
    return lines


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _difference(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a - b:+.1f} dB"


def _training_lines(curves: dict) -> list[str]:
    """FID by step per run, and the step at which each reached the other's final FID."""
    lines = [
        f"- {name}: FID by step " + ", ".join(f"{step}: {fid:.2f}" for step, fid in c["fid"])
        for name, c in curves.items()
    ]
    (a_name, a), (b_name, b) = curves.items()
    for (x_name, x), (y_name, y) in (((a_name, a), (b_name, b)), ((b_name, b), (a_name, a))):
        target = y["fid"][-1][1]
        reached = next((step for step, fid in x["fid"] if fid <= target), None)
        lines.append(
            f"- {x_name} reached {y_name}'s final FID ({target:.2f}) "
            + (f"at step {reached}" if reached is not None else "not within its run")
        )
    return lines


def _series(row: Row) -> str:
    """A row's curve in the plot: its policy; adaptive Skip-Cache and DyDiT apart."""
    if row.label.startswith("dydit"):
        return "dydit (+ skip_cache)"
    if row.policy == "skip_cache" and "th=" in row.label:
        return "skip_cache adaptive"
    return row.policy


def _plot_speedup(rows: list[Row], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in rows:
        if r.label != "none":
            series.setdefault((_series(r), r.model), []).append((r.speedup, r.psnr))
    names = list(dict.fromkeys(name for name, _ in series))  # one colour per policy
    models = list(dict.fromkeys(model for _, model in series))  # one line style per model
    for (name, model), pts in series.items():
        xs, ys = zip(*sorted(pts), strict=True)
        style = models.index(model) % 3
        ax.plot(xs, ys, color=f"C{names.index(name) % 10}", linestyle=("-", "--", ":")[style],
                marker="osv"[style], label=f"{name} ({model})")  # fmt: skip
    ax.set_xlabel("wall-clock speedup vs uncached")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_training(curves: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, curve in curves.items():
        steps, losses = zip(*curve["loss"], strict=True)
        k = 50
        smooth = [sum(losses[max(0, i - k) : i + 1]) / len(losses[max(0, i - k) : i + 1])
                  for i in range(len(losses))]  # fmt: skip
        a.plot(steps, smooth, label=name)
        if curve["fid"]:
            b.plot(*zip(*curve["fid"], strict=True), marker="o", label=name)
    a.set_xlabel("training step")
    a.set_ylabel("loss (moving mean)")
    b.set_xlabel("training step")
    b.set_ylabel("classifier FID")
    a.legend()
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_pictures(grids: dict[str, dict[str, torch.Tensor]], out: Path) -> None:
    """grid.png (a row per setting, a column per class) of the first image model, with
    grid_rows.txt naming its rows, and grid_<model>.png (+ _rows.txt) of every other (a text
    model: a column per prompt, the first 8 held-out prompts); per video model and setting a
    looping GIF whose frames put the first clip of each class side by side
    (``strip_<model>_<setting>.gif``)."""
    images = {m: g for m, g in grids.items() if next(iter(g.values())).ndim == 4}
    for i, (model, shown) in enumerate(images.items()):  # the first: grid.png, then by name
        name = "grid" if i == 0 else "grid_" + "".join(ch if ch.isalnum() else "_" for ch in model)
        sheet = torch.cat(list(shown.values()))  # (settings * columns, H, W, 1)
        to_pil(grid(sheet, cols=len(next(iter(shown.values()))))).save(out / f"{name}.png")
        (out / f"{name}_rows.txt").write_text("\n".join(shown) + "\n")
    for model, settings_clips in grids.items():
        if model in images:
            continue
        for label, clips in settings_clips.items():  # clips (classes, F, H, W, 1)
            frames = torch.stack([grid(clips[:, f], cols=len(clips)) for f in range(clips.size(1))])
            slug = "".join(ch if ch.isalnum() else "_" for ch in f"{model}_{label}")
            (out / f"strip_{slug}.gif").write_bytes(animate(frames, "gif", fps=4))


def write_outputs(
    rows: list[Row],
    grids: dict[str, dict[str, torch.Tensor]],
    curves: dict,
    opts: BenchOptions,
    notes: Sequence[str] = (),
) -> None:
    """results.md/json, speedup_vs_psnr.png, the pictures (``_write_pictures``) and
    training.png when there are curves."""
    import matplotlib

    matplotlib.use("Agg")
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("\n".join([*_table(rows, curves, opts), *notes]) + "\n")
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    _plot_speedup(rows, out / "speedup_vs_psnr.png")
    _write_pictures(grids, out)
    if curves:
        _plot_training(curves, out / "training.png")


def bench(opts: BenchOptions) -> list[Row]:
    judge = Judge.load()
    rows: list[Row] = []
    grids: dict[str, dict[str, torch.Tensor]] = {}
    notes: list[str] = []
    configs: dict[str, DiTConfig] = {}
    for name in opts.models or registry.shipped_models():
        loaded = registry.load(name)
        pipeline, card = loaded.pipeline, loaded.card
        configs[name] = loaded.config
        base = registry.load(card["from"]).pipeline if loaded.config.dynamic else None
        workload = workload_of(loaded.info, judge, opts)
        model_rows, grids[name] = bench_model(name, pipeline, workload, opts, base, card)
        rows += model_rows
        if loaded.info.conditioning == "text":
            shown = shown_prompts(loaded.info, opts)
            notes.append(f"\n{name}: the grid's columns are the prompts " + "; ".join(shown))
        if loaded.info.kind == "video" and loaded.info.conditioning == "class":
            notes.append(_real_clips_note(name, pipeline.model.config, judge.classifier.source))
    for skip, plain in twins(configs):
        notes += ["", *twin_lines(rows, skip, plain)]
    curves = training_curves(opts.runs, opts, judge) if opts.runs else {}
    write_outputs(rows, grids, curves, opts, [*notes, "", *floor_lines(rows)])
    return rows


def workload_of(info: registry.ModelInfo, judge: Judge, opts: BenchOptions) -> Workload:
    """The model's workload: held-out prompts (text-to-image, text-to-video) or classes."""
    if info.conditioning == "class":
        return class_workload(info.config.num_classes, judge, opts)
    if info.kind == "video":
        return text_video_workload(judge.classifier, opts)
    return text_workload(judge.classifier, opts)


def shown_prompts(info: registry.ModelInfo, opts: BenchOptions) -> list[str]:
    """The prompts of a text model's grid (or strips), in order."""
    if info.kind == "video":
        return motion.held_out_prompts(opts.clip_prompts, opts.seed)[:GRID_PROMPTS]
    return scenes.held_out_prompts(opts.prompts, opts.seed)[:GRID_PROMPTS]


def twins(configs: dict[str, DiTConfig]) -> list[tuple[str, str]]:
    """(Skip-DiT, DiT) pairs among the models: the same network but for the long skips."""
    return [
        (skip, plain)
        for skip, a in configs.items()
        for plain, b in configs.items()
        if a.long_skip and not b.long_skip and a.replace(long_skip=False) == b
    ]


def twin_lines(rows: list[Row], skip: str, plain: str) -> list[str]:
    """Each cache setting of either twin beside the other twin at the same FLOP ratio: the
    other's PSNR interpolated (linearly, in FLOP ratio) between its own settings of the same
    policy ("-" outside their range). Difference: Skip-DiT's PSNR minus DiT's, positive where
    the long skips keep more of the uncached image."""
    lines = [
        f"## {skip} against its twin without long skips ({plain}), at equal FLOP ratio\n",
        "| policy | setting | FLOP ratio | "
        f"{skip} PSNR | {plain} PSNR | difference |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in sorted((r for r in rows if r.model in (skip, plain) and r.label != "none"),
                      key=lambda r: (_series(r), r.flop_ratio)):  # fmt: skip
        other = skip if row.model == plain else plain
        same = sorted((r.flop_ratio, r.psnr) for r in rows
                      if r.model == other and _series(r) == _series(row))  # fmt: skip
        at = None
        if len(same) >= 2 and same[0][0] <= row.flop_ratio <= same[-1][0]:
            ratios, psnrs = zip(*same, strict=True)
            at = float(np.interp(row.flop_ratio, ratios, psnrs))
        psnr = {row.model: row.psnr, other: at}
        cells = [_num(psnr[skip], ".1f"), _num(psnr[plain], ".1f"),
                 _difference(psnr[skip], psnr[plain])]  # fmt: skip
        lines.append(f"| {_series(row)} | {row.label} ({row.model}) | {row.flop_ratio:.2f}x | "
                     + " | ".join(cells) + " |")  # fmt: skip
    return lines


def floor_lines(rows: list[Row]) -> list[str]:
    """The quality floors (``model.training.floors``) of the rows' settings, each beside its new
    figure: a floor a re-run falls below, or a figure the table no longer matches, is in plain
    view."""
    return floor_table({(r.model, r.label): Measured(r.psnr, r.accuracy, r.steps_cached)
                        for r in rows})  # fmt: skip


def _real_clips_note(name: str, config: DiTConfig, source: str) -> str:
    """Temporal consistency of real moving-digit clips of the model's size (held-out digits),
    the reference for its generated clips."""
    digits = data.load(source, config.input_size, "held_out")
    side = config.input_size
    clips = data.moving(
        digits, torch.arange(len(digits.labels)), torch.Generator().manual_seed(0),
        config.num_frames, side, data.clip_digit_size(side),
    )  # fmt: skip
    uint8 = ((clips + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (n, 1, F, H, W)
    real = temporal_difference(uint8.permute(0, 2, 3, 4, 1))
    return (
        f"\n{name}: real moving-digit clips (held-out digits, same size and motion) change by "
        f"{real:.3f} a frame; generated clips near that move like the data, far below it "
        f"are frozen, far above it flicker."
    )
