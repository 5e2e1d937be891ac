"""Training a class-conditional (Skip-)DiT on bundled digits, or a (Skip-)Latte on clips of
them bouncing (``model.training.data.moving``, video presets): ``skipdit train``.

DiT recipe: AdamW at a constant learning rate, EMA of the weights, class dropout 0.1 (the null
class that guidance needs), linear beta schedule over 1000 steps, epsilon prediction with MSE.
Each step draws its batch, timesteps and noise from a generator seeded by (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would.

Writes into ``--out``: ``checkpoint.pt`` (``{model, ema, opt, step, args}``, the official
training-checkpoint layout, replaced atomically every ``--checkpoint-every`` steps),
``loss.csv`` (step, loss, seconds), ``snapshots/step_XXXXXX.safetensors`` (EMA weights, for
quality-vs-step curves) and ``final/`` (EMA weights in our pretrained format with a model card).
Options: ``model.training.options.TrainOptions``.
"""

from __future__ import annotations

import copy
import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from model import registry
from model.errors import FieldError
from model.networks.checkpoint import load_state, save_pretrained
from model.networks.dydit import DyDiT, FlopModel, flop_model, is_router
from model.networks.presets import Config, build, preset
from model.networks.skip_dit import SkipDiT
from model.networks.skip_latte import SkipLatte, start_video
from model.networks.text_dit import TextDiTConfig
from model.training import data, motion, scenes, t2i
from model.training.options import TrainOptions

log = logging.getLogger(__name__)

ARCHITECTURES = {
    ("image", True): "Skip-DiT",
    ("image", False): "DiT",
    ("video", True): "Skip-Latte",
    ("video", False): "Latte",
}


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            if p.requires_grad:
                e.lerp_(p, 1 - decay)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


@dataclass
class _Run:
    """What a checkpoint holds: the weights, the optimizer and where the run stands."""

    model: SkipDiT | t2i.Trainee
    ema: SkipDiT | t2i.Trainee
    opt: torch.optim.Optimizer
    step: int = 0
    seconds: float = 0.0  # training time so far, resumed runs included
    lr_history: list[list[float]] = field(default_factory=list)  # [step, lr] pairs

    @classmethod
    def fresh(
        cls,
        config: Config,
        opts: TrainOptions,
        tokenizer: PreTrainedTokenizerFast | None,
        start: Path | None = None,
    ) -> _Run:
        """A run at step 0; a text run with ``start`` (``--init-from``'s export) from its
        weights."""
        torch.manual_seed(opts.seed)
        model: SkipDiT | t2i.Trainee
        if isinstance(config, TextDiTConfig):  # the network and its text encoder, jointly
            assert tokenizer is not None
            model = t2i.fresh(config, tokenizer).train()
            if start is not None:
                fresh = t2i.start_from(model, start, tokenizer)
                log.info("started from %s; new: %s", start, fresh or "none")
        elif opts.from_model is not None:  # DyDiT fine-tune: the base's weights, routers all on
            model = DyDiT.from_base(registry.load(opts.from_model).pipeline.model).train()
        else:
            model = build(config).train()
            torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=opts.label_init_std)
        if opts.init_from is not None and not isinstance(config, TextDiTConfig):
            if config.kind != "video":
                raise FieldError("init_from", "starts a video model from an image model")
            video = cast(SkipLatte, model)  # a video config builds a Skip-Latte
            _start_video(video, registry.load(opts.init_from).pipeline.model, opts.init_from)
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        opt = torch.optim.AdamW(_param_groups(model, opts), weight_decay=0.0)
        return cls(model, ema, opt, lr_history=[[0, opts.lr]])

    def resume(self, path: Path, opts: TrainOptions) -> None:
        """Load ``path`` (also the global RNG: class dropout and DyDiT's Gumbel noise draw from
        it) and set the learning rates of ``opts``."""
        lr = opts.lr
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        load_state(self.model, ckpt["model"])
        load_state(self.ema, ckpt["ema"])
        self.opt.load_state_dict(ckpt["opt"])
        self.step, self.seconds = ckpt["step"], ckpt.get("seconds", 0.0)
        self.lr_history = ckpt.get("lr_history", [[0, ckpt["opt"]["param_groups"][0]["lr"]]])
        torch.set_rng_state(ckpt["rng"])
        if self.lr_history[-1][1] != lr:
            self.lr_history.append([self.step, lr])
        for group, group_lr in zip(self.opt.param_groups, (lr, opts.router_lr), strict=False):
            group["lr"] = group_lr  # the network's, then (a DyDiT's) the routers' group
        log.info("resumed %s at step %d (lr %g)", path, self.step, lr)

    def save(self, path: Path, opts: TrainOptions) -> None:
        state = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "seconds": self.seconds,
            "lr_history": self.lr_history,
            "rng": torch.get_rng_state(),
            "args": opts.model_dump(mode="json"),
        }
        _atomic_save(state, path)


def _param_groups(model: nn.Module, opts: TrainOptions) -> list[dict[str, Any]]:
    """The network's parameters at ``lr``, then (a DyDiT's) its routers' at ``router_lr``."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not is_router(n)], "lr": opts.lr},
        {"params": [p for n, p in named if is_router(n)], "lr": opts.router_lr},
    ]
    return [g for g in groups if g["params"]]


def _loss_log(path: Path, start: int, columns: list[str]) -> tuple[Any, Any]:
    """(file, csv writer) appending to ``path``, without rows past ``start`` (a resume)."""
    if start > 0 and path.exists():  # drop rows logged after the checkpoint we resume from
        rows = path.read_text().splitlines()
        kept = [r for r in rows[1:] if int(r.split(",")[0]) <= start]
        path.write_text("\n".join([rows[0], *kept]) + "\n")
    file = path.open("a", newline="")
    writer = csv.writer(file)
    if start == 0:
        writer.writerow(columns)
    return file, writer


Source = data.Digits | t2i.Batches  # what batches are drawn from: digits, or captioned scenes


def _batch(
    config: Config, source: Source, opts: TrainOptions, g: torch.Generator
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``opts.batch_size`` training samples (n, ...) and their condition: (labels,), or (token
    ids, mask, parse labels). Class samples are drawn uniformly, those of ``opts.boost_classes``
    ``opts.boost`` times as often."""
    n = opts.batch_size
    if isinstance(source, t2i.Batches):
        return source.draw(n, g)
    idx = class_indices(source.labels, n, g, opts.boost_classes, opts.boost)
    return _samples(config, source, idx, g), (source.labels[idx],)


def class_indices(
    labels: torch.Tensor, n: int, g: torch.Generator, boost_classes: list[int], boost: float
) -> torch.Tensor:
    """n sample indices drawn from ``g``: uniformly, those of ``boost_classes`` ``boost`` times
    as likely as the rest (the uniform draw, unchanged, when none is boosted)."""
    if not boost_classes:
        return torch.randint(0, len(labels), (n,), generator=g)
    weights = torch.ones(len(labels))
    weights[torch.isin(labels, torch.tensor(boost_classes))] = boost
    return torch.multinomial(weights, n, replacement=True, generator=g)


FLOW_TIMESTEPS = 1000  # a flow sample at sigma s is fed the timestep s * 1000, as diffusers'


def _noised(
    opts: TrainOptions, schedule: DDPMScheduler, x0: torch.Tensor, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy samples, the timesteps fed to the network, the regression target).

    eps: DDPM's ``add_noise`` at t ~ U{0..999}, target the noise. flow: rectified flow,
    x_s = (1 - s) x0 + s noise, target the velocity noise - x0 (what
    ``FlowMatchEulerDiscreteScheduler.step`` integrates from s = 1 to 0), with s drawn by
    ``opts.flow_t``: sigmoid of a standard normal (SD3's logit-normal), or U[0, 1)."""
    n = x0.shape[0]
    if opts.objective == "flow":
        if opts.flow_t == "logit-normal":
            s = torch.sigmoid(torch.randn(n, generator=g))
        else:
            s = torch.rand(n, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        sv = s.view(-1, *[1] * (x0.dim() - 1))
        return (1 - sv) * x0 + sv * noise, s * FLOW_TIMESTEPS, noise - x0
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return schedule.add_noise(x0, noise, t), t, noise


def _train_step(
    run: _Run,
    source: Source,
    schedule: DDPMScheduler,
    opts: TrainOptions,
    budget: FlopModel | None,
) -> tuple[float, float | None]:
    """One optimizer step on the batch, timesteps and noise seeded by (seed, step). Returns
    the loss (a text run's without its parse term) and the run's extra column: for a DyDiT
    (``budget``: its FLOPs) the batch's FLOPs ratio, for a text run the encoder's scene-parse
    loss (``t2i.Trainee.losses``)."""
    g = torch.Generator().manual_seed(opts.seed * 1_000_003 + run.step)
    x0, cond = _batch(run.model.config, source, opts, g)  # (B, ...), condition
    xt, t, target = _noised(opts, schedule, x0, g)
    extra: torch.Tensor | None = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=opts.bf16):
        if isinstance(run.model, t2i.Trainee):
            pred, extra = run.model.losses(xt, t, *cond)
        elif budget is None:
            pred = run.model(xt, t, *cond)
        else:
            dydit = cast(DyDiT, run.model)  # a FLOPs budget: a dynamic config, a DyDiT
            pred, captured = dydit.capturing(xt, t, cond[0], dydit.usage_capture())
    loss = F.mse_loss(pred.float(), target)
    logged = loss.item()  # a text run logs the denoising loss, its parse loss apart
    if extra is not None:
        loss = loss + opts.parse_weight * extra
    if budget is not None:
        usage = cast(DyDiT, run.model).usage(captured).float()  # (B, depth, 3)
        extra = budget.ratio(usage).mean()
        loss = loss + opts.flops_weight * (extra - opts.flops_ratio) ** 2
        # DyDiT's floor: each block's MLP keeps at least token_minimal of the tokens.
        loss = loss + (opts.token_minimal - usage[..., 2].mean(0)).clamp(min=0).sum()
        logged = loss.item()
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    run.opt.step()
    _ema_update(run.ema, run.model, min(opts.ema_decay, (1 + run.step) / (10 + run.step)))
    run.step += 1
    return logged, None if extra is None else extra.item()


def _samples(
    config: Config, digits: data.Digits, idx: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """The batch's training samples: (B, 1, S, S) digits, or (B, 1, F, S, S) clips of them
    bouncing on an S x S canvas (their motion drawn from ``g``)."""
    if config.kind == "image":
        return digits.images[idx]
    side = config.input_size
    return data.moving(digits, idx, g, config.num_frames, side, data.clip_digit_size(side))


def train(opts: TrainOptions) -> Path:
    """Train (or resume) the run in ``opts.out``; returns the exported ``final/`` directory."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    config = _config(opts)
    out = opts.out
    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    source: Source
    tokenizer, start = None, None
    ckpt_path = out / "checkpoint.pt"
    if isinstance(config, TextDiTConfig):
        start = None if opts.init_from is None else _init_dir(opts.init_from)
        tokenizer = t2i.tokenizer_for(config, out, start)
        boost = dict.fromkeys(opts.boost_motions, opts.boost)
        source = t2i.Batches(config, tokenizer, opts.scene_jitter, boost)
    else:
        source = data.load(opts.data, size=config.input_size, split="train")
    # a resumed run reads its weights from the checkpoint, not from the export it started from
    run = _Run.fresh(config, opts, tokenizer, None if ckpt_path.exists() else start)
    if ckpt_path.exists():
        run.resume(ckpt_path, opts)
    budget = flop_model(cast(DyDiT, run.model)) if config.dynamic else None
    schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    # the extra column: a DyDiT's FLOPs ratio, a text run's parse loss (not in ``loss``)
    extra_column = "flops" if budget is not None else "parse" if tokenizer is not None else None
    columns = ["step", "loss", "seconds"] + ([extra_column] if extra_column else [])
    loss_file, writer = _loss_log(out / "loss.csv", run.step, columns)
    bar = tqdm(range(run.step, opts.steps), initial=run.step, total=opts.steps, desc=out.name)
    with loss_file:
        for _ in bar:
            began = time.perf_counter()
            loss, extra = _train_step(run, source, schedule, opts, budget)
            run.seconds += time.perf_counter() - began
            logged = [] if extra is None else [f"{extra:.4f}"]
            writer.writerow([run.step, f"{loss:.5f}", f"{run.seconds:.1f}", *logged])
            shown = {} if extra is None else {extra_column or "": f"{extra:.3f}"}
            bar.set_postfix(loss=f"{loss:.4f}", **shown)
            last = run.step == opts.steps
            if run.step % opts.snapshot_every == 0 or last:
                # copies: a tied T5 embedding would be one tensor under two names
                snap = {k: v.detach().clone() for k, v in run.ema.state_dict().items()}
                save_file(snap, out / "snapshots" / f"step_{run.step:06d}.safetensors")
            if run.step % opts.checkpoint_every == 0 or last:
                run.save(ckpt_path, opts)
                loss_file.flush()
    card = _card(config, opts, run, source)
    if isinstance(run.ema, t2i.Trainee):
        assert tokenizer is not None
        final = t2i.export(run.ema, tokenizer, out / "final", card)
    else:
        final = save_pretrained(run.ema, out / "final", card=card)
    log.info("wrote %s after %d steps (%.0fs)", final, opts.steps, run.seconds)
    return final


def _start_video(video: SkipLatte, start: SkipDiT, name: str) -> None:
    """``--init-from`` of a video run: an image model's blocks become the spatial blocks
    (Latte's initialisation), or a video model of the same network carries on training."""
    try:
        start_video(video, start)
    except ValueError as e:
        raise FieldError("init_from", f"{name}: {e}") from e


def _init_dir(name: str) -> Path:
    """The directory of the model ``--init-from`` names (shipped or a path)."""
    kind, where = registry.source(name)
    if kind != "pretrained":
        raise FieldError("init_from", f"{name} is not a model directory (ours: config.json)")
    return Path(where)


DEFAULT_SKIP_CACHE = {"policy": "skip_cache", "interval": 2}


def _config(opts: TrainOptions) -> Config:
    """The network to train: a preset, or (a DyDiT fine-tune) the base model's plus routers."""
    if opts.dynamic != (opts.from_model is not None):
        raise FieldError("dynamic", "--dynamic and --from go together: a DyDiT fine-tune")
    if opts.from_model is None:
        config = preset(opts.preset, long_skip=not opts.vanilla)
    else:
        config = registry.describe(opts.from_model).config
        if config.kind != "image" or config.dynamic:
            raise FieldError("from_model", f"{opts.from_model} is not a static image model")
        config = config.replace(dynamic=True)
    text = isinstance(config, TextDiTConfig)
    if config.in_channels != 1 or (not text and config.num_classes != 10):
        raise FieldError("preset", f"{opts.preset} is not a 1-channel 10-class digit model")
    if text and opts.init_from and registry.describe(opts.init_from).conditioning != "text":
        raise FieldError("init_from", f"{opts.init_from} is not a text model")
    if opts.scene_jitter != scenes.JITTER and not (text and config.kind == "image"):
        raise FieldError("scene_jitter", "places digits of text-to-image scenes only")
    if opts.boost_classes and (text or not all(0 <= c < 10 for c in opts.boost_classes)):
        allowed = "class presets only" if text else "each 0..9"
        raise FieldError("boost_classes", f"{opts.boost_classes}: {allowed}")
    video_text = text and config.kind == "video"
    if opts.boost_motions and not (video_text and set(opts.boost_motions) <= set(motion.NAMES)):
        allowed = f"each one of {list(motion.NAMES)}" if video_text else "text-to-video only"
        raise FieldError("boost_motions", f"{opts.boost_motions}: {allowed}")
    if text and config.input_size != scenes.CANVAS:
        raise FieldError("preset", f"text-to-image scenes are {scenes.CANVAS}x{scenes.CANVAS}")
    return config


def _card(config: Config, opts: TrainOptions, run: _Run, source: Source) -> dict:
    card = _base_card(config, opts, run, source)
    if opts.from_model is not None:
        base = registry.describe(opts.from_model)
        card |= {
            "architecture": f"{ARCHITECTURES[config.kind, config.long_skip]} + DyDiT",
            "from": opts.from_model,
            "default_guidance": base.default_guidance,
            "dydit": {
                "flops_ratio": opts.flops_ratio,
                "flops_weight": opts.flops_weight,
                "token_minimal": opts.token_minimal,
                "router_lr": opts.router_lr,
            },
        }
        del card["label_init_std"]  # the base's label embedding is kept
    return card


def _describe_data(config: Config, opts: TrainOptions, source: Source) -> str:
    side = config.input_size
    if isinstance(source, t2i.Batches) and config.kind == "video":
        return (
            f"captioned clips of {opts.data} digits (train split glyphs) moving on "
            f"{side}x{side}, {config.num_frames} frames, held-out wordings and (digit, motion) "
            "combinations never drawn (model.training.motion)"
        )
    if isinstance(source, t2i.Batches):
        return (
            f"captioned scenes of {opts.data} digits (train split glyphs) on {side}x{side}, "
            "held-out wordings and (digit, place) combinations never drawn "
            "(model.training.scenes)"
        )
    return f"{opts.data} digits, {side}x{side}, train split ({len(source.labels)} images)" + (
        f", {data.clip_digit_size(side)} px digits bouncing, {config.num_frames} frames"
        if config.kind == "video"
        else ""
    )


def _base_card(config: Config, opts: TrainOptions, run: _Run, source: Source) -> dict:
    text = isinstance(config, TextDiTConfig)
    return {
        "name": opts.name or opts.out.name,
        "architecture": ARCHITECTURES[config.kind, config.long_skip]
        + (" (PixArt-alpha blocks, text)" if text else ""),
        "data": _describe_data(config, opts, source),
        "steps": opts.steps,
        "batch_size": opts.batch_size,
        "lr_history": run.lr_history,
        "ema_decay": opts.ema_decay,
        "bf16": opts.bf16,
        "seed": opts.seed,
        "label_init_std": opts.label_init_std,
        "init_from": opts.init_from,
        **(
            {"boost": {"classes": opts.boost_classes, "factor": opts.boost}}
            if opts.boost_classes
            else {"boost": {"motions": opts.boost_motions, "factor": opts.boost}}
            if opts.boost_motions
            else {}
        ),
        "train_seconds": round(run.seconds, 1),
        "default_guidance": 2.0,
        **({"parse_weight": opts.parse_weight} if text else {}),
        **({"scene_jitter": opts.scene_jitter} if text and config.kind == "image" else {}),
        # A flow model samples with flow_euler: the card's sampler is what requests default to.
        **(
            {"objective": "flow", "sampler": "flow_euler", "flow_t": opts.flow_t}
            if opts.objective == "flow"
            else {}
        ),
        # What a request that names no cache field runs: a network with long skips serves
        # Skip-Cache at the bench's closest setting (N=2), a vanilla DiT uncached.
        **({"default_cache": DEFAULT_SKIP_CACHE} if config.long_skip else {}),
    }
