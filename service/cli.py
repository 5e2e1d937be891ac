"""The ``skipdit`` command line.

Options are derived from the pydantic schemas (``service.request.GenerateParams``,
``model.training.options``): names, defaults, ranges and help live in the fields, once. Every
invalid input exits with status 2 and one line that names the field. ``train``,
``train-classifier`` and ``bench`` need the ``train`` extra; the base install describes them and,
when run, says which extra to install instead of failing with a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar, cast

import torch
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from model import registry
from model.cache import Mode
from model.errors import FieldError
from model.networks.checkpoint import CheckpointError
from model.sampling.images import grid
from model.sampling.pipeline import Job
from model.training.options import (
    AdapterOptions,
    BenchOptions,
    CalibrateOptions,
    ClassifierOptions,
    TrainOptions,
)
from service.images import encode
from service.messages import DEFAULT_FPS, MAX_FPS
from service.request import GenerateParams, echo, prompt_result, resolve
from service.settings import Settings
from service.video import VIDEO_FORMATS, encode_video

log = logging.getLogger(__name__)

Command = Callable[[argparse.Namespace, str], int]
Schema = TypeVar("Schema", bound=BaseModel)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fail(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {message}\n")
    raise SystemExit(2)


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    if not first["loc"]:  # a check across fields names the fields itself
        return first["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in first["loc"])
    return f"{field}: {first['msg']}, got {first.get('input')!r}"


# ----------------------------------------------------------------------------- schema -> flags


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (annotation, False)."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return annotation, False


def _range(info: FieldInfo) -> str:
    """The field's numeric bounds as an interval, e.g. " Range: [1, 1000]." ("" if none)."""
    b = {k: getattr(m, k) for m in info.metadata for k in ("ge", "gt", "le", "lt") if hasattr(m, k)}
    low = f"[{b['ge']}" if "ge" in b else f"({b['gt']}" if "gt" in b else ""
    high = f"{b['le']}]" if "le" in b else f"{b['lt']})" if "lt" in b else ""
    if not (low or high):
        return ""
    return f" Range: {low or '(-inf'}, {high or 'inf)'}."


def _add_field(parser: argparse.ArgumentParser, name: str, info: FieldInfo, default: Any) -> None:
    kind, optional = _unwrap(info.annotation)
    extra = cast(dict[str, Any], info.json_schema_extra or {})  # our fields give a dict
    flags = ["--" + name.replace("_", "-"), *extra.get("cli_aliases", [])]
    help_ = (info.description or "") + _range(info)
    if kind is bool and optional:  # unset, --name or --no-name
        action = argparse.BooleanOptionalAction
        parser.add_argument(*flags, dest=name, action=action, default=default, help=help_)
        return
    if kind is bool:
        parser.add_argument(*flags, dest=name, action="store_true", help=help_)
        return
    options: dict[str, Any] = {"dest": name, "default": default}
    if typing.get_origin(kind) is list:
        kind = typing.get_args(kind)[0]
        options["nargs"] = "*" if default == [] else "+"
    if typing.get_origin(kind) is typing.Literal:  # validated by the schema: its own message
        help_ += f" One of: {', '.join(map(str, typing.get_args(kind)))}."
        kind = type(typing.get_args(kind)[0])
    if info.is_required():
        options["required"] = True
    elif default is not None:
        help_ += f" Default: {default}."
    elif optional:
        help_ += " Default: unset."
    parser.add_argument(*flags, type=kind, help=help_.strip(), **options)


def add_schema(
    parser: argparse.ArgumentParser,
    schema: type[BaseModel],
    defaults: dict[str, Any] | None = None,
    skip: Sequence[str] = (),
) -> None:
    """One flag per field of ``schema`` (``--cache-interval`` for ``cache_interval``)."""
    defaults = defaults or {}
    for name, info in schema.model_fields.items():
        if name in skip:
            continue
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        _add_field(parser, name, info, defaults.get(name, default))


def parse_schema(schema: type[Schema], args: argparse.Namespace, prog: str, **extra: Any) -> Schema:
    """The schema instance from parsed flags; a bad value exits 2 naming the field."""
    values = {n: getattr(args, n) for n in schema.model_fields if hasattr(args, n)}
    try:
        return schema(**values, **extra)
    except ValidationError as e:
        _fail(prog, _validation_message(e))


def _needs_extra(extra: str, command: Command) -> Command:
    """Run ``command``; a module of the ``extra`` that is not installed exits 2 naming it."""

    def run(args: argparse.Namespace, prog: str) -> int:
        try:
            return command(args, prog)
        except ModuleNotFoundError as e:
            _fail(
                prog,
                f'needs the "{extra}" extra (module {e.name!r} is not installed): '
                f'pip install -e ".[{extra}]"',
            )

    return run


# ----------------------------------------------------------------------------- generate


def _write(out: Path, images: torch.Tensor, fps: float) -> None:
    """(n, H, W, c) images: a PNG grid. (n, F, H, W, c) videos: to .mp4/.gif/.webp an animation
    whose frame f is the grid of every video's frame f; else a PNG grid, a row per video."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if images.ndim == 4:
        out.write_bytes(encode(grid(images)))
        return
    frames = images.shape[1]
    fmt = out.suffix.lower().removeprefix(".")
    if fmt in VIDEO_FORMATS:
        clip = torch.stack([grid(images[:, f]) for f in range(frames)])  # (F, H', W', c)
        out.write_bytes(encode_video(clip, fmt, fps))
    else:
        out.write_bytes(encode(grid(images.flatten(0, 1), cols=frames)))  # (n*F, H, W, c) in


# The CLI's own defaults where they differ from the API's (a grid reads better than one image).
_GENERATE_DEFAULTS = {"num_images": 4}


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images (or videos) and write a PNG grid")
    add_schema(p, GenerateParams, _GENERATE_DEFAULTS)
    p.add_argument("--vae", default=None, help="local AutoencoderKL directory (latent models)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out.png"),
        help="PNG grid path; video models: .mp4, .gif or .webp writes an animation of the grids",
    )
    p.add_argument("--fps", type=float, default=DEFAULT_FPS, help="video models: frames/second")
    p.add_argument("--json", action="store_true", help="print stats as one JSON object")
    p.set_defaults(func=_generate)


def _generate(args: argparse.Namespace, prog: str) -> int:
    params = parse_schema(GenerateParams, args, prog)
    if not 0 < args.fps <= MAX_FPS:
        _fail(prog, f"fps: must be in (0, {MAX_FPS:g}], got {args.fps}")
    try:  # the request is checked before any weights (or a text encoder) load
        run = resolve(params, registry.describe(params.model))
        loaded = registry.load(params.model, device=args.device, vae_path=args.vae)
    except (FieldError, CheckpointError) as e:
        _fail(prog, str(e))
    random_note = " (RANDOM untrained weights: smoke test only)" if loaded.random_weights else ""
    print(f"model: {loaded.name}{random_note}")

    def progress(job: Job, mode: Mode) -> None:
        log.info("step %d/%d %s", job.step, job.total_steps, mode.value)

    (result,) = loaded.pipeline.generate([run], progress=progress)
    _write(args.out, cast(torch.Tensor, result.images), args.fps)  # never cancelled: set
    stats = {
        "model": loaded.name,
        "random_weights": loaded.random_weights,
        **{k: v for k, v in echo(run).items() if k in ("cache_policy", "cache_interval")},
        **result.stats.as_dict(),
        **prompt_result(run, result.prompt_report),
        "seconds_total": result.seconds,
        "out": str(args.out),
    }
    if args.json:
        print(json.dumps(stats))
        return 0
    _print_prompts(stats, loaded.info.max_tokens)
    s = result.stats
    full_ms = (s.mean_seconds(Mode.FULL) or 0) * 1e3
    cached = s.mean_seconds(Mode.CACHED)
    cached_ms = f" ({cached * 1e3:.1f} ms each)" if cached is not None else ""
    print(
        f"steps: {s.steps[Mode.FULL]} full ({full_ms:.1f} ms each), "
        f"{s.steps[Mode.CACHED]} cached{cached_ms}"
    )
    print(f"time: {result.seconds:.2f} s total, model speedup {s.speedup():.2f}x")
    print(f"wrote {args.out}")
    return 0


def _print_prompts(stats: dict[str, Any], max_tokens: int | None) -> None:
    """A text model's prompts: tokens read, and a cut said out loud."""
    for name in ("prompt", "negative_prompt"):
        if f"{name}_tokens" not in stats:
            continue
        cut = (
            f" (TRUNCATED at the model's {max_tokens} tokens)" if stats[f"{name}_truncated"] else ""
        )
        print(f"{name.replace('_', ' ')}: {stats[f'{name}_tokens']} tokens{cut}")


# ----------------------------------------------------------------------------- serve, worker


def _settings(prog: str, models: list[str] | None, **overrides: Any) -> Settings:
    """Settings from the environment; flags given override it. ``--model`` (repeatable) replaces
    both SKIPDIT_MODEL and SKIPDIT_MODELS."""
    values: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if models:
        values |= {"models": models, "model": None}
    try:
        return Settings(**values)
    except ValidationError as e:
        _fail(prog, _validation_message(e))


def _serve(args: argparse.Namespace, prog: str) -> int:
    import uvicorn

    from service.api import build_app

    settings = _settings(prog, args.model, host=args.host, port=args.port)
    logging.getLogger().setLevel(settings.log_level)
    app = build_app(settings, own_process=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower())
    return 0


def _worker(args: argparse.Namespace, prog: str) -> int:
    from service.worker import run_worker_process

    settings = _settings(prog, args.model, metrics_port=args.metrics_port)
    if settings.redis_url is None:
        _fail(prog, "SKIPDIT_REDIS_URL: a worker process needs Redis (serve embeds its own worker)")
    logging.getLogger().setLevel(settings.log_level)
    return run_worker_process(settings)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the HTTP API (embedded queue + worker without Redis)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    models_help = "a model to serve; repeat for several (default: SKIPDIT_MODELS / SKIPDIT_MODEL)"
    p.add_argument("--model", action="append", help=models_help)
    p.set_defaults(func=_serve)
    w = sub.add_parser("worker", help="run a GPU/CPU worker that takes jobs from Redis")
    w.add_argument("--model", action="append", help=models_help)
    w.add_argument("--metrics-port", type=int, default=None)
    w.set_defaults(func=_worker)


# ----------------------------------------------------------------------------- train extra


def _train(args: argparse.Namespace, prog: str) -> int:
    opts = parse_schema(TrainOptions, args, prog)
    from model.training.train import train

    return _trained(prog, lambda: train(opts))


def _train_adapter(args: argparse.Namespace, prog: str) -> int:
    command_line = "skipdit " + " ".join(sys.argv[1:])
    opts = parse_schema(AdapterOptions, args, prog, command_line=command_line)
    from model.training.adapter import train_adapter

    return _trained(prog, lambda: train_adapter(opts))


def _trained(prog: str, run: Callable[[], Path]) -> int:
    """Run a training command; a FieldError fails naming its field, else the export is said."""
    try:
        final = run()
    except FieldError as e:
        _fail(prog, str(e))
    print(f"wrote {final}")
    return 0


def _train_classifier(args: argparse.Namespace, prog: str) -> int:
    opts = parse_schema(ClassifierOptions, args, prog)
    from model.training.evaluate import save_classifier, train_classifier

    model, acc = train_classifier(opts.data, opts.size, opts.epochs, opts.seed)
    card = {
        "data": f"{opts.data} digits {opts.size}x{opts.size}, train split",
        "epochs": opts.epochs,
        "seed": opts.seed,
        "held_out_accuracy": round(acc, 4),
        "command": f"skipdit train-classifier --data {opts.data} --epochs {opts.epochs} "
        f"--seed {opts.seed}",
    }
    save_classifier(model, opts.out, card)
    print(f"held-out accuracy {acc:.4f}; wrote {opts.out}")
    return 0


def _bench(args: argparse.Namespace, prog: str) -> int:
    command_line = "skipdit " + " ".join(sys.argv[1:])
    opts = parse_schema(BenchOptions, args, prog, command_line=command_line)
    from model.training.bench import bench, floor_lines

    rows = bench(opts)
    for row in rows:
        quality = f", FID {row.fid:.2f}" if row.fid is not None else ""
        quality += f", frame change {row.temporal:.3f}" if row.temporal is not None else ""
        print(f"{row.model} {row.label}: {row.speedup:.2f}x wall, {row.flop_ratio:.2f}x FLOPs, "
              f"PSNR {row.psnr:.1f}, acc {row.accuracy:.1%}{quality}")  # fmt: skip
    print("\n".join(floor_lines(rows)))
    print(f"wrote {opts.out}")
    return 0


def _add_train_extra(sub: argparse._SubParsersAction) -> None:
    commands: list[tuple[str, str, type[BaseModel], Command]] = [
        ("train", "train a digit Skip-DiT / DiT (resumable)", TrainOptions, _train),
        ("train-adapter", "train a LoRA adapter of a shipped image model (resumable)",
         AdapterOptions, _train_adapter),
        ("train-classifier", "train the digit classifier used to evaluate", ClassifierOptions,
         _train_classifier),
        ("bench", "every cache policy on the shipped models: speed and quality", BenchOptions,
         _bench),
    ]  # fmt: skip
    for name, help_, schema, command in commands:
        p = sub.add_parser(name, help=f"{help_} [needs the train extra]")
        add_schema(p, schema, skip=("command_line",))
        p.set_defaults(func=_needs_extra("train", command))


# ----------------------------------------------------------------------------- calibrate


def _calibrate_teacache(args: argparse.Namespace, prog: str) -> int:
    command_line = "skipdit " + " ".join(sys.argv[1:])
    opts = parse_schema(CalibrateOptions, args, prog, command_line=command_line)
    from model.training.calibrate import calibrate

    try:
        entries = calibrate(opts)
    except (FieldError, CheckpointError) as e:
        _fail(prog, str(e))
    for name, entry in entries.items():
        where = "" if opts.dry_run else " (written to its card)"
        print(f"{name}: coefficients {entry['coefficients']}{where}")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate-teacache", help="fit TeaCache's polynomial per model, store it in its card"
    )
    add_schema(p, CalibrateOptions, skip=("command_line",))
    p.set_defaults(func=_calibrate_teacache)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="skipdit", description="Skip-DiT serving with Skip-Cache")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    _add_serve(sub)
    _add_train_extra(sub)
    _add_calibrate(sub)
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
