"""What a LoRA adapter does to the shipped image model, measured: the same class labels and
seeds generated with and without it (every request in one batch, as served), their stroke width
(``model.training.strokes.ink_pixels``) and the shipped classifier's accuracy; the base's
training digits, plain and in the adapter's style, give the reference widths.

    python -m model.training.bench_adapter --adapter model/weights/adapters/bold-strokes

prints the table and writes it to ``--out`` (default ``docs/bench/adapter.md``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from model import registry
from model.networks import lora
from model.training import data, strokes
from model.training.evaluate import accuracy, load_classifier

log = logging.getLogger(__name__)


def measure(images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean ink pixels per image, classifier accuracy) of (N, 1, H, W) images in [-1, 1]."""
    return strokes.ink_pixels(images).mean().item(), accuracy(load_classifier(), images, labels)


def bench(
    adapter_dir: Path, per_class: int, steps: int, seed: int, scales: Sequence[float]
) -> list[tuple[str, float, float]]:
    """Rows (setting, mean ink pixels, accuracy): training data plain and bold, then the base
    model and the adapter at each scale on the same labels and seeds (one request a class)."""
    meta = lora.read_meta(adapter_dir)
    pipeline = registry.load(meta["base"]).pipeline
    pipeline.adapters[meta["name"]] = lora.load(adapter_dir, pipeline.model)
    digits = data.load("sklearn", size=pipeline.model.config.input_size, split="train")
    rows = [
        ("training digits (train split)", *measure(digits.images, digits.labels)),
        ("training digits, bold (what the adapter saw)",
         *measure(strokes.bold(digits.images), digits.labels)),
    ]  # fmt: skip
    settings: list[tuple[str, dict]] = [(f"{meta['base']} (no adapter)", {})]
    settings += [
        (f"+ {meta['name']}, scale {s:g}", {"adapter": meta["name"], "adapter_scale": s})
        for s in scales
    ]
    labels = torch.arange(10).repeat_interleave(per_class)
    plans = [
        pipeline.plan(class_label=c, num_images=per_class, steps=steps, seed=seed + c,
                      policy="none", **extra)
        for _, extra in settings
        for c in range(10)
    ]  # fmt: skip
    began = time.perf_counter()
    results = pipeline.generate(plans)  # every setting's requests share each step's batch
    log.info("generated %d images in %.1fs", len(plans) * per_class, time.perf_counter() - began)
    for i, (name, _) in enumerate(settings):
        mine = results[i * 10 : (i + 1) * 10]
        images = torch.cat([strokes.from_uint8(r.images) for r in mine if r.images is not None])
        rows.append((name, *measure(images, labels)))
    return rows


def table(rows: Sequence[tuple[str, float, float]], command: str, header: str) -> str:
    columns = "| images | ink pixels per image (mean) | class accuracy |"
    lines = [header, "", f"`{command}`", "", columns, "|---|---|---|"]
    lines += [f"| {name} | {ink:.1f} | {acc:.0%} |" for name, ink, acc in rows]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model.training.bench_adapter")
    p.add_argument("--adapter", type=Path, default=Path("model/weights/adapters/bold-strokes"))
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps, uncached")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("docs/bench/adapter.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench(args.adapter, args.per_class, args.steps, args.seed, args.scales)
    given = sys.argv[1:] if argv is None else list(argv)
    command = "python -m model.training.bench_adapter " + " ".join(given)
    header = (
        f"# LoRA adapter `{args.adapter.name}`: stroke width and class accuracy\n\n"
        f"{args.per_class} images per class, DDIM-{args.steps} uncached, seed {args.seed} + class, "
        "guidance: the base card's. Ink pixels: pixels above half intensity "
        "(`model.training.strokes.ink_pixels`); accuracy: the shipped classifier."
    )
    text = table(rows, command.strip(), header)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
