"""Training a class-conditional (Skip-)DiT on bundled digits: ``skipdit train``.

DiT recipe: AdamW at a constant learning rate, EMA of the weights, class dropout 0.1 (the null
class that guidance needs), linear beta schedule over 1000 steps, epsilon prediction with MSE.
Each step draws its batch, timesteps and noise from a generator seeded by (seed, step), so a
resumed run sees exactly the batches an uninterrupted one would.

Writes into ``--out``: ``checkpoint.pt`` (``{model, ema, opt, step, args}``, the official
training-checkpoint layout, replaced atomically every ``--checkpoint-every`` steps),
``loss.csv`` (step, loss, seconds), ``snapshots/step_XXXXXX.safetensors`` (EMA weights, for
quality-vs-step curves) and ``final/`` (EMA weights in our pretrained format with a model card).
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import save_file
from tqdm import tqdm

from model import data
from model.checkpoint import load_state, save_pretrained
from model.skip_dit import SkipDiT, preset

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="digits-small")
    p.add_argument("--vanilla", action="store_true", help="train the DiT twin (no long skips)")
    p.add_argument("--data", default="sklearn", help="sklearn | mnist")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--ema-decay", type=float, default=0.999, help="cap of a warmed-up decay")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--label-init-std",
        type=float,
        default=0.02,
        help="std of the class embedding init (DiT: 0.02); larger lets short runs condition",
    )
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--snapshot-every", type=int, default=250)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", default=None, help="model name written in the card")


def _ema_update(ema: SkipDiT, model: SkipDiT, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            if p.requires_grad:
                e.lerp_(p, 1 - decay)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train(args: argparse.Namespace) -> Path:
    if args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    (out / "snapshots").mkdir(parents=True, exist_ok=True)
    config = preset(args.preset, long_skip=not args.vanilla)
    digits = data.load(args.data, size=config.input_size, split="train")
    if config.in_channels != 1 or config.num_classes != 10:
        raise ValueError(f"preset: {args.preset} is not a 1-channel 10-class digit model")

    torch.manual_seed(args.seed)
    model = SkipDiT(config).train()
    torch.nn.init.normal_(model.y_embedder.embedding_table.weight, std=args.label_init_std)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    start, seconds = 0, 0.0
    lr_history = [[0, args.lr]]  # [step, lr]: a resumed run may change the learning rate
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        load_state(model, ckpt["model"])
        load_state(ema, ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        start, seconds = ckpt["step"], ckpt.get("seconds", 0.0)
        lr_history = ckpt.get("lr_history", [[0, ckpt["opt"]["param_groups"][0]["lr"]]])
        torch.set_rng_state(ckpt["rng"])
        if lr_history[-1][1] != args.lr:
            lr_history.append([start, args.lr])
        for group in opt.param_groups:
            group["lr"] = args.lr
        log.info("resumed %s at step %d (lr %g)", ckpt_path, start, args.lr)
    loss_path = out / "loss.csv"
    if start > 0 and loss_path.exists():  # drop rows logged after the checkpoint we resume from
        rows = loss_path.read_text().splitlines()
        kept = [r for r in rows[1:] if int(r.split(",")[0]) <= start]
        loss_path.write_text("\n".join([rows[0], *kept]) + "\n")
    loss_file = loss_path.open("a", newline="")
    writer = csv.writer(loss_file)
    if start == 0:
        writer.writerow(["step", "loss", "seconds"])

    def save(step: int) -> None:
        state = {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "seconds": seconds,
            "lr_history": lr_history,
            "rng": torch.get_rng_state(),
            "args": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(args).items()
                if isinstance(v, int | float | str | bool | Path | None)
            },
        }
        _atomic_save(state, ckpt_path)
        loss_file.flush()

    n = len(digits.labels)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=str(out.name))
    for step in bar:
        began = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        x0, y = digits.images[idx], digits.labels[idx]  # (B, 1, S, S), (B,)
        t = torch.randint(0, 1000, (args.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        xt = noise_schedule.add_noise(x0, noise, t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(xt, t, y)
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _ema_update(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
        seconds += time.perf_counter() - began
        writer.writerow([step + 1, f"{loss.item():.5f}", f"{seconds:.1f}"])
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % args.snapshot_every == 0 or done == args.steps:
            snap = {k: v.contiguous() for k, v in ema.state_dict().items()}
            save_file(snap, out / "snapshots" / f"step_{done:06d}.safetensors")
        if done % args.checkpoint_every == 0 or done == args.steps:
            save(done)
    loss_file.close()
    card = {
        "name": args.name or out.name,
        "architecture": "Skip-DiT" if config.long_skip else "DiT",
        "data": f"{args.data} digits, {config.input_size}x{config.input_size}, train split "
        f"({n} images)",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr_history": lr_history,
        "ema_decay": args.ema_decay,
        "bf16": args.bf16,
        "seed": args.seed,
        "label_init_std": args.label_init_std,
        "train_seconds": round(seconds, 1),
        "default_guidance": 2.0,
    }
    final = save_pretrained(ema, out / "final", card=card)
    log.info("wrote %s after %d steps (%.0fs)", final, args.steps, seconds)
    return final
