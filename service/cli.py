"""The ``skipdit`` command line.

``skipdit generate`` samples images with the pipeline and writes a PNG grid; every invalid
input exits with status 2 and one line that names the field.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pydantic import ValidationError

from model import registry
from model.cache import Mode
from model.checkpoint import CheckpointError
from model.errors import FieldError
from model.pipeline import Job
from model.request import GenerateParams
from service.images import encode, grid
from service.settings import Settings

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "request"
    return f"{field}: {first['msg']}, got {first.get('input')!r}"


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images and write a PNG grid")
    p.add_argument("--model", default=None, help="shipped name, random:<preset> or local path")
    p.add_argument("--vae", default=None, help="local AutoencoderKL directory (latent models)")
    p.add_argument("--class-label", type=int, default=0)
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", help="ddim | ddpm | dpm++")
    p.add_argument("--guidance-scale", type=float, default=None, help="1 = off; default: model's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--cache-policy",
        default="skip_cache",
        help="none | skip_cache | fora | delta_dit | toca | fbcache",
    )
    p.add_argument("--cache-threshold", type=float, default=None, help="fbcache threshold")
    p.add_argument("--cache-ratio", type=float, default=None, help="toca: tokens refreshed")
    p.add_argument("--cache-interval", type=int, default=1, help="full step every N (1 = off)")
    p.add_argument("--cache-depth", type=int, default=None, help="K blocks fresh at each end")
    p.add_argument("--cache-t-start", type=float, default=None)
    p.add_argument("--cache-t-end", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("out.png"), help="PNG grid path")
    p.add_argument("--json", action="store_true", help="print stats as one JSON object")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace, prog: str) -> int:
    try:
        params = GenerateParams(
            model=args.model,
            class_label=args.class_label,
            num_images=args.num_images,
            steps=args.steps,
            sampler=args.sampler,
            guidance_scale=args.guidance_scale,
            seed=args.seed,
            cache_policy=args.cache_policy,
            cache_interval=args.cache_interval,
            cache_depth=args.cache_depth,
            cache_t_start=args.cache_t_start,
            cache_t_end=args.cache_t_end,
            cache_threshold=args.cache_threshold,
            cache_ratio=args.cache_ratio,
        )
        loaded = registry.load(params.model, device=args.device, vae_path=args.vae)
        params.check_for(loaded.config)
    except ValidationError as e:
        _fail(prog, _validation_message(e))
    except (FieldError, CheckpointError) as e:
        _fail(prog, str(e))
    if loaded.random_weights:
        print(f"model: {loaded.name} (RANDOM untrained weights: smoke test only)")
    else:
        print(f"model: {loaded.name}")

    def progress(job: Job, mode: Mode) -> None:
        log.info("step %d/%d %s", job.step, job.total_steps, mode.value)

    (result,) = loaded.pipeline.generate([params], progress=progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encode(grid(result.images)))
    stats = {
        "model": loaded.name,
        "random_weights": loaded.random_weights,
        "cache_interval": params.cache_interval,
        **result.stats.as_dict(),
        "seconds_total": result.seconds,
        "out": str(args.out),
    }
    if args.json:
        print(json.dumps(stats))
    else:
        s = result.stats
        full_ms = (s.mean_seconds(Mode.FULL) or 0) * 1e3
        cached = s.mean_seconds(Mode.CACHED)
        print(
            f"steps: {s.steps[Mode.FULL]} full ({full_ms:.1f} ms each), "
            f"{s.steps[Mode.CACHED]} cached"
            + (f" ({cached * 1e3:.1f} ms each)" if cached is not None else "")
        )
        print(f"time: {result.seconds:.2f} s total, model speedup {s.speedup():.2f}x")
        print(f"wrote {args.out}")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from model import train

    p = sub.add_parser("train", help="train a digit Skip-DiT / DiT (resumable)")
    train.add_arguments(p)
    p.set_defaults(func=lambda args, prog: train.train(args) and 0)


def _settings(prog: str, **overrides: object) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:
        _fail(prog, _validation_message(e))


def _serve(args: argparse.Namespace, prog: str) -> int:
    import uvicorn

    from service.api import build_app

    settings = _settings(prog, host=args.host, port=args.port, model=args.model)
    logging.getLogger().setLevel(settings.log_level)
    app = build_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


def _worker(args: argparse.Namespace, prog: str) -> int:
    from service.worker import run_worker_process

    settings = _settings(prog, model=args.model, metrics_port=args.metrics_port)
    if settings.redis_url is None:
        _fail(prog, "SKIPDIT_REDIS_URL: a worker process needs Redis (serve embeds its own worker)")
    logging.getLogger().setLevel(settings.log_level)
    return run_worker_process(settings)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (embedded queue + worker without Redis)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model", default=None)
    p.set_defaults(func=_serve)
    w = sub.add_parser("worker", help="run a GPU/CPU worker that takes jobs from Redis")
    w.add_argument("--model", default=None)
    w.add_argument("--metrics-port", type=int, default=None)
    w.set_defaults(func=_worker)


def _train_classifier(args: argparse.Namespace, prog: str) -> int:
    from model.evaluate import save_classifier, train_classifier

    model, acc = train_classifier(args.data, args.size, args.epochs, args.seed)
    card = {
        "data": f"{args.data} digits {args.size}x{args.size}, train split",
        "epochs": args.epochs,
        "seed": args.seed,
        "held_out_accuracy": round(acc, 4),
        "command": f"skipdit train-classifier --data {args.data} --epochs {args.epochs} "
        f"--seed {args.seed}",
    }
    save_classifier(model, args.out, card)
    print(f"held-out accuracy {acc:.4f}; wrote {args.out}")
    return 0


def _add_train_classifier(sub: argparse._SubParsersAction) -> None:
    from model.evaluate import CLASSIFIER_DIR

    p = sub.add_parser("train-classifier", help="train the digit classifier used to evaluate")
    p.add_argument("--data", default="sklearn")
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    p.set_defaults(func=_train_classifier)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from model import bench

    p = sub.add_parser("bench", help="every cache policy on the shipped models: speed and quality")
    bench.add_arguments(p)

    def run(args: argparse.Namespace, prog: str) -> int:
        args.command_line = "skipdit " + " ".join(sys.argv[1:])
        for row in bench.bench(args):
            print(f"{row.model} {row.label}: {row.speedup:.2f}x wall, {row.flop_ratio:.2f}x FLOPs, "
                  f"PSNR {row.psnr:.1f}, acc {row.accuracy:.1%}, FID {row.fid:.2f}")  # fmt: skip
        print(f"wrote {args.out}")
        return 0

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="skipdit", description="Skip-DiT serving with Skip-Cache")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_train(sub)
    _add_serve(sub)
    _add_train_classifier(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.func(args, f"skipdit {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
