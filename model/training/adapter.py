"""Training a LoRA adapter of a shipped class-conditional image model: ``skipdit
train-adapter``.

The base network is frozen; only each adapter's A and B learn (``model.networks.lora``, applied
exactly as the serving engine applies it). The data are the base's own training digits in a
style (``bold``: ``model.training.strokes.bold``), the loss the base's (eps MSE, linear betas,
1000 steps), a share of rows on the null class so guidance keeps working. Each step draws its
batch, timesteps and noise from a generator seeded by (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would.

Writes into ``--out``: ``checkpoint.pt`` (adapter, optimizer, step, seconds; replaced
atomically), ``loss.csv`` (step, loss, seconds) and ``final/`` (the adapter's directory with its
card). Options: ``model.training.options.AdapterOptions``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from tqdm import tqdm

from model import registry
from model.errors import FieldError
from model.networks import lora
from model.training import data, strokes
from model.training.options import AdapterOptions
from model.training.train import _loss_log

log = logging.getLogger(__name__)

STYLES = {"bold": strokes.bold}


def _checkpoint(path: Path, adapter: lora.LoRA, opt: torch.optim.Optimizer, step: int,
                seconds: float) -> None:  # fmt: skip
    state = {"adapter": adapter.state_dict(), "opt": opt.state_dict(), "step": step,
             "seconds": seconds}  # fmt: skip
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train_adapter(opts: AdapterOptions) -> Path:
    """Train (or resume) the adapter run in ``opts.out``; returns the exported ``final/``."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    info = registry.describe(opts.base)
    if info.kind != "image" or info.conditioning != "class" or info.latent:
        raise FieldError("base", f"{opts.base} is not a class-conditional pixel image model")
    model = registry.load(opts.base).pipeline.model.eval().requires_grad_(False)
    null_class = model.config.num_classes
    digits = data.load(opts.data, size=model.config.input_size, split="train")
    images = STYLES[opts.style](digits.images)  # (N, 1, S, S) in [-1, 1]
    adapter = lora.fresh(
        model, opts.name, info.name, opts.rank, opts.alpha,
        generator=torch.Generator().manual_seed(opts.seed),
    )  # fmt: skip
    opt = torch.optim.AdamW(adapter.parameters(), lr=opts.lr, weight_decay=0.0)
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, step, seconds = out / "checkpoint.pt", 0, 0.0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for target, (a, b) in adapter.weights.items():
                a.copy_(ckpt["adapter"][f"{target}.lora_A"])
                b.copy_(ckpt["adapter"][f"{target}.lora_B"])
        opt.load_state_dict(ckpt["opt"])
        step, seconds = ckpt["step"], ckpt["seconds"]
        log.info("resumed %s at step %d", ckpt_path, step)
    schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    loss_file, writer = _loss_log(out / "loss.csv", step, ["step", "loss", "seconds"])
    bar = tqdm(range(step, opts.steps), initial=step, total=opts.steps, desc=out.name)
    with loss_file:
        for _ in bar:
            began = time.perf_counter()
            g = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
            idx = torch.randint(0, len(digits.labels), (opts.batch_size,), generator=g)
            x0, labels = images[idx], digits.labels[idx]  # (B, 1, S, S), (B,)
            drop = torch.rand(opts.batch_size, generator=g) < opts.class_dropout
            labels = torch.where(drop, null_class, labels)
            t = torch.randint(0, 1000, (opts.batch_size,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            xt = schedule.add_noise(x0, noise, t)
            rows = lora.Rows.of([(lora.Choice(adapter), opts.batch_size)], x0.device)
            with lora.applied(model, rows):
                pred = model(xt, t, labels)  # (B, 1, S, S)
            loss = F.mse_loss(pred, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seconds += time.perf_counter() - began
            writer.writerow([step, f"{loss.item():.5f}", f"{seconds:.1f}"])
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % opts.checkpoint_every == 0 or step == opts.steps:
                _checkpoint(ckpt_path, adapter, opt, step, seconds)
                loss_file.flush()
    card = {
        "style": opts.style,
        "data": f"{opts.data} digits, train split ({len(digits.labels)} images), "
        f"{opts.style} ({STYLES[opts.style].__doc__ and 'model.training.strokes.' + opts.style})",
        "steps": opts.steps,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "class_dropout": opts.class_dropout,
        "seed": opts.seed,
        "train_seconds": round(seconds, 1),
        "command": opts.command_line,
    }
    final = lora.save(adapter, out / "final", card)
    log.info("wrote %s after %d steps (%.0fs)", final, opts.steps, seconds)
    return final
