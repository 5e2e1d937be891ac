"""Helpers the model tests share (imported from here, never from another test module)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from model.cache import Mode
from model.networks.dydit import DyDiT
from model.sampling.pipeline import Job, Pipeline
from service.cli import build_parser
from service.request import GenerateParams
from tests.helpers import plan_of


def tiny_vae() -> AutoencoderKL:
    """A 4-channel AutoencoderKL that downsamples by 2 (16x16 pixels <-> 8x8 latents)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    )


def routing(model: DyDiT, seed: int = 1) -> DyDiT:
    """Random routers: masks that differ across timesteps, rows and tokens."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            for rate in (block.attn_rate, block.mlp_rate):
                rate.router.weight.normal_(0, 1)
                rate.router.bias.normal_(0, 1)
            block.token_selection.mlp_head[-1].weight.normal_(0, 1)
            block.token_selection.mlp_head[-1].bias.zero_()
    return model


def run_with_modes(
    pipeline: Pipeline, requests: list[GenerateParams]
) -> tuple[list[torch.Tensor], list[list[Mode]]]:
    """Each request's latents and the mode each of its steps really ran in."""
    modes: dict[int, list[Mode]] = {}

    def progress(job: Job, mode: Mode) -> None:
        modes.setdefault(id(job.plan), []).append(mode)

    plans = [plan_of(pipeline, p) for p in requests]
    results = pipeline.generate(plans, progress=progress)
    return [r.latents for r in results], [modes[id(p)] for p in plans]


def train_run(out: Path, steps: int, *args: str) -> None:
    """``skipdit train`` of ``steps`` into ``out`` as the CLI runs it (checkpoints and EMA
    snapshots every 2 steps); ``args``: its other flags."""
    parsed = build_parser().parse_args(
        ["train", "--steps", str(steps), "--checkpoint-every", "2", "--snapshot-every", "2",
         "--out", str(out), *args]
    )  # fmt: skip
    parsed.func(parsed, "skipdit train")
