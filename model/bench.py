"""``skipdit bench``: every cache policy at several settings on the shipped models, in one run.

For each model and each (policy, setting): wall-clock speedup against the uncached run of the
same batch timed right after it (a shared machine drifts by 10-30% over minutes; adjacent pairs
cancel most of that; the median over ``--repeats`` pairs), FLOP ratio (counted with torch's
FlopCounterMode over a real run, not a formula: the two differ because cached steps keep fixed
costs), cache memory per image, PSNR and SSIM against the uncached images of the same seeds,
class accuracy of the shipped classifier and FID on its features against held-out real digits.
Writes ``results.md`` (tables), ``speedup_vs_psnr.png``, ``grid.png`` (same seeds across
settings) and, given training runs, ``training.png`` (loss and FID against training step for
Skip-DiT and its DiT twin).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from model import data, registry
from model.cache import Mode
from model.checkpoint import load_state
from model.evaluate import (
    DigitClassifier,
    accuracy,
    features,
    frechet_distance,
    load_classifier,
    psnr_ssim,
)
from model.pipeline import Job, Pipeline, denoise_step
from model.request import GenerateParams
from model.skip_dit import SkipDiT

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
    accuracy: float
    fid: float
    steps_cached: float  # mean fraction of steps cached


def settings(intervals: list[int], thresholds: list[float]) -> list[tuple[str, str, dict]]:
    out: list[tuple[str, str, dict]] = [("none", "none", {})]
    for policy in ("skip_cache", "fora", "delta_dit"):
        out += [(f"{policy} N={n}", policy, {"cache_interval": n}) for n in intervals]
    out += [(f"toca N={n} r=0.25", "toca", {"cache_interval": n, "cache_ratio": 0.25})
            for n in intervals]  # fmt: skip
    out += [(f"fbcache th={t}", "fbcache", {"cache_threshold": t}) for t in thresholds]
    return out


def requests(
    policy: str, options: dict, per_class: int, steps: int, seed: int, classes: int
) -> list[GenerateParams]:
    return [
        GenerateParams(
            class_label=c,
            num_images=per_class,
            steps=steps,
            seed=seed + c,
            cache_policy=policy,
            **options,
        )
        for c in range(classes)
    ]


def counted_flops(pipeline: Pipeline, params: GenerateParams) -> float:
    """FLOPs of one request's whole run, counted op by op."""
    job = pipeline.start(params)
    with FlopCounterMode(display=False) as counter:
        while not job.done:
            denoise_step(pipeline.model, [job])
    return float(counter.get_total_flops())


def timed_run(pipeline: Pipeline, batch: list[GenerateParams]) -> tuple[Any, float, float]:
    """(results, wall seconds, peak cache bytes per image) for one batched run."""
    peak = 0.0

    def progress(job: Job, mode: Mode) -> None:
        nonlocal peak
        held = job.cache.policy.state_bytes(job.cache.state) / job.params.num_images
        peak = max(peak, held)

    began = time.perf_counter()
    results = pipeline.generate(batch, progress=progress)
    return results, time.perf_counter() - began, peak


def bench_model(
    name: str,
    pipeline: Pipeline,
    classifier: DigitClassifier,
    real_features: Any,
    args: argparse.Namespace,
) -> tuple[list[Row], dict[str, torch.Tensor]]:
    classes = pipeline.model.config.num_classes
    labels = torch.arange(classes).repeat_interleave(args.per_class)
    pipeline.generate(requests("none", {}, 1, 2, 0, 1))  # warm-up
    rows, grids = [], {}
    reference: torch.Tensor | None = None
    base_flops = 0.0
    uncached = requests("none", {}, args.per_class, args.steps, args.seed, classes)
    for label, policy, options in settings(args.intervals, args.thresholds):
        batch = requests(policy, options, args.per_class, args.steps, args.seed, classes)
        results, seconds, peak = timed_run(pipeline, batch)
        ratios = []
        for i in range(args.repeats):  # same seeds, same images: only the time differs
            if i:
                seconds = timed_run(pipeline, batch)[1]
            base = seconds if policy == "none" else timed_run(pipeline, uncached)[1]
            ratios.append(base / seconds)
        images = torch.cat([r.images for r in results])  # (n, H, W, 1)
        flops = counted_flops(pipeline, batch[0])
        if reference is None:
            reference, base_flops = images, flops
        psnr, ssim = psnr_ssim(images, reference)
        cached = sum(r.stats.steps[Mode.CACHED] for r in results) / (len(results) * args.steps)
        rows.append(
            Row(
                model=name,
                label=label,
                policy=policy,
                speedup=statistics.median(ratios),
                flop_ratio=base_flops / flops,
                cache_bytes_per_image=peak,
                psnr=psnr,
                ssim=ssim,
                accuracy=accuracy(classifier, images, labels),
                fid=frechet_distance(features(classifier, images), real_features),
                steps_cached=cached,
            )
        )
        grids[label] = images[:: args.per_class]  # first image of each class
        log.info("%s %s: %.2fx, PSNR %.1f", name, label, rows[-1].speedup, psnr)
    return rows, grids


def training_curves(run_dirs: list[Path], args: argparse.Namespace, classifier, real) -> dict:
    """Loss and FID against training step, from each run's loss.csv and EMA snapshots."""
    curves = {}
    for run in run_dirs:
        card = json.loads((run / "final" / "config.json").read_text())
        config = registry.describe(str(run / "final"))[1]
        with (run / "loss.csv").open() as f:
            loss = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
        fids = []
        for snap in sorted((run / "snapshots").glob("step_*.safetensors")):
            model = load_state(SkipDiT(config), load_file(snap))
            pipeline = Pipeline(model, default_guidance=card["card"].get("default_guidance", 2.0))
            batch = requests("none", {}, args.per_class, args.curve_steps, args.seed, 10)
            images = torch.cat([r.images for r in pipeline.generate(batch)])
            fids.append(
                (int(snap.stem.split("_")[1]), frechet_distance(features(classifier, images), real))
            )
        curves[card["card"].get("architecture", run.name)] = {"loss": loss, "fid": fids}
    return curves


def write_outputs(rows: list[Row], grids: dict, curves: dict, out: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Cache policies on the shipped digit models\n",
        f"`{args.command_line}` — {args.per_class} images per class, DDIM {args.steps} steps, "
        f"guidance from each model card, one batch per setting, wall speedup "
        f"against an uncached run timed right after (median of {args.repeats} pair(s)), this "
        f"machine's CPU.\n",
        "| model | setting | speedup (wall) | FLOP ratio | cached steps | cache / image "
        "| PSNR dB | SSIM | accuracy | FID |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r.model} | {r.label} | {r.speedup:.2f}x | {r.flop_ratio:.2f}x | "
            f"{r.steps_cached:.0%} | {r.cache_bytes_per_image / 1024:.0f} KiB | "
            f"{'inf' if r.psnr == float('inf') else f'{r.psnr:.1f}'} | {r.ssim:.3f} | "
            f"{r.accuracy:.1%} | {r.fid:.2f} |"
        )
    if len(curves) == 2 and all(c["fid"] for c in curves.values()):
        lines += ["", "## Training comparison", ""]
        lines += [
            f"- {name}: FID by step "
            + ", ".join(f"{step}: {fid:.2f}" for step, fid in curve["fid"])
            for name, curve in curves.items()
        ]
        (a_name, a), (b_name, b) = curves.items()
        for (x_name, x), (y_name, y) in (((a_name, a), (b_name, b)), ((b_name, b), (a_name, a))):
            target = y["fid"][-1][1]
            reached = next((step for step, fid in x["fid"] if fid <= target), None)
            lines.append(
                f"- {x_name} reached {y_name}'s final FID ({target:.2f}) "
                + (f"at step {reached}" if reached is not None else "not within its run")
            )
    (out / "results.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=1))

    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r.model for r in rows}):
        for policy in ("skip_cache", "fora", "delta_dit", "toca", "fbcache"):
            pts = [(r.speedup, r.psnr) for r in rows if r.model == model and r.policy == policy]
            if pts:
                xs, ys = zip(*sorted(pts), strict=True)
                ax.plot(xs, ys, marker="o", label=f"{policy} ({model})")
    ax.set_xlabel("wall-clock speedup vs uncached")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "speedup_vs_psnr.png", dpi=120)
    plt.close(fig)

    first = next(iter(grids.values()))
    sheet = torch.cat([grids[k] for k in grids])  # rows: settings, columns: classes
    cols = first.shape[0]
    h, w = sheet.shape[1:3]
    canvas = torch.zeros((len(grids) * (h + 2), cols * (w + 2), 1), dtype=torch.uint8)
    for i, image in enumerate(sheet):
        r, c = divmod(i, cols)
        canvas[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = image
    Image.fromarray(canvas[..., 0].numpy()).save(out / "grid.png")
    (out / "grid_rows.txt").write_text("\n".join(grids) + "\n")

    if curves:
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
        fig.savefig(out / "training.png", dpi=120)
        plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=None, help="default: every shipped model")
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed (setting, uncached) pairs")
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="training runs to plot")
    p.add_argument("--curve-steps", type=int, default=25, help="DDIM steps for training FID")
    p.add_argument("--out", type=Path, default=Path("docs/bench"))


def bench(args: argparse.Namespace) -> list[Row]:
    classifier = load_classifier()
    real = data.load(classifier.source, classifier.size, "held_out")
    real_features = features(classifier, real.images)
    rows: list[Row] = []
    grids: dict[str, torch.Tensor] = {}
    for name in args.models or registry.shipped_models():
        loaded = registry.load(name)
        model_rows, model_grids = bench_model(
            name, loaded.pipeline, classifier, real_features, args
        )
        rows += model_rows
        if not grids:
            grids = model_grids  # the grid shows the first model
    curves = training_curves(args.runs, args, classifier, real_features) if args.runs else {}
    write_outputs(rows, grids, curves, args.out, args)
    return rows
