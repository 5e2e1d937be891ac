"""Typed options of the offline commands (train, train-classifier, bench, calibrate-teacache).

Each command's options are one pydantic model: ranges and help live in the fields, and the CLI
derives its flags from them. This module imports nothing from the ``train`` extra, so the CLI can
describe (and ``--help``) every command on the base install; the commands themselves need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DigitSource = Literal["sklearn", "mnist"]
CLASSIFIER_DIR = Path(__file__).parents[1] / "weights" / "classifier"
# Pixels a text-to-image scene's digit may sit off its place's centre, each axis, by default
# (model.training.scenes.JITTER: what the renderer draws unless --scene-jitter says otherwise).
SCENE_JITTER = 2


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainOptions(_Options):
    """``skipdit train``: a class-conditional (Skip-)DiT on bundled digits, or (a
    ``digits-t2i*`` preset) a text-conditioned one with its text encoder on captioned scenes of
    them; resumable."""

    out: Path = Field(..., description="Run directory (resumed when it holds a checkpoint).")
    preset: str = Field(
        "digits-small",
        description="Network preset (digits-video-* trains a video model, digits-t2i* a "
        "text-to-image model).",
    )
    vanilla: bool = Field(False, description="Train the DiT twin (no long skips).")
    init_from: str | None = Field(
        None,
        description="Video presets: start from this image model (a shipped name or a directory) "
        "as Latte does: its blocks become the spatial blocks, temporal blocks start as identity; "
        "or carry on training a video model of the preset's network (its weights, a new "
        "optimizer). "
        "Text presets: start from this exported text-to-image model (network, encoder and "
        "tokenizer); modules the preset adds (pooled_text) start fresh.",
    )
    from_model: str | None = Field(
        None,
        description="Fine-tune this image model (a shipped name or a directory) into a DyDiT: "
        "its weights plus routers that start with everything on (needs --dynamic).",
        json_schema_extra={"cli_aliases": ["--from"]},
    )
    dynamic: bool = Field(False, description="Add DyDiT routers (with --from).")
    flops_ratio: float = Field(
        0.5,
        ge=0.05,
        le=1.0,
        description="DyDiT: target FLOPs of a forward over the base network's (lambda), "
        "whole network, as model.networks.flops counts it.",
    )
    flops_weight: float = Field(2.0, ge=0, description="DyDiT: weight of the FLOPs loss.")
    token_minimal: float = Field(
        0.1, ge=0, le=1, description="DyDiT: least share of tokens each block's MLP keeps."
    )
    router_lr: float = Field(
        0.05,
        gt=0,
        description="DyDiT: AdamW learning rate of the routers (a short fine-tune moves their "
        "biases from 'all on' only with a rate far above the network's).",
    )
    objective: Literal["eps", "flow"] = Field(
        "eps",
        description="eps: DDPM noise prediction (linear betas, 1000 steps); flow: rectified "
        "flow (velocity noise - x0, sampled with flow_euler).",
    )
    flow_t: Literal["logit-normal", "uniform"] = Field(
        "logit-normal",
        description="flow: where training draws the noise level s: logit-normal(0, 1) (SD3's "
        "choice, most of the signal at mid noise where layout and identity form) or U(0, 1).",
    )
    parse_weight: float = Field(
        1.0,
        ge=0,
        description="text presets: weight of the encoder's scene-parse loss (each stated "
        "digit's token read as its digit, place and size; 0: the denoising loss alone).",
    )
    data: DigitSource = Field("sklearn", description="Bundled digit set.")
    scene_jitter: int = Field(
        SCENE_JITTER,
        ge=0,
        le=8,
        description="digits-t2i presets: pixels a digit may sit off its place's centre, each "
        "axis (kept inside its place's region); more spreads each digit over more positions.",
    )
    boost_classes: list[int] = Field(
        [],
        description="Class presets: draw these classes' samples --boost times as often as the "
        "others' (a fine-tune of the classes a model draws worst); each 0..9.",
    )
    boost_motions: list[str] = Field(
        [],
        description="Text-to-video presets: draw clips of these motions (left, right, up, down, "
        "'up and down', 'left and right') --boost times as often as the others' (a run that "
        "learns some motions' words slower than the rest).",
    )
    boost: float = Field(
        2.0,
        ge=1,
        le=10,
        description="With --boost-classes or --boost-motions: how much more often they are drawn.",
    )
    steps: int = Field(2000, ge=1, description="Optimizer steps in all (a resume continues).")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant).")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="Cap of a warmed-up EMA decay.")
    seed: int = Field(0, ge=0)
    label_init_std: float = Field(
        0.02,
        gt=0,
        description="Std of the class embedding init (DiT: 0.02); larger lets short runs "
        "condition.",
    )
    bf16: bool = Field(False, description="bf16 autocast for the forward.")
    threads: int | None = Field(None, ge=1, description="torch CPU threads.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between resumable checkpoints.")
    snapshot_every: int = Field(250, ge=1, description="Steps between EMA weight snapshots.")
    name: str | None = Field(None, description="Model name in the card (default: out's name).")


class AdapterOptions(_Options):
    """``skipdit train-adapter``: a LoRA adapter of a shipped class-conditional image model,
    its base frozen, trained on the base's training digits drawn with bolder strokes; resumable."""

    out: Path = Field(..., description="Run directory (resumed when it holds a checkpoint).")
    base: str = Field("digits-skip-dit", description="The frozen base model (name or directory).")
    name: str = Field("bold-strokes", description="The adapter's name (requests name it).")
    style: Literal["bold"] = Field(
        "bold",
        description="bold: each digit dilated by a 3x3 max filter (strokes about 2 px thicker).",
    )
    rank: int = Field(4, ge=1, le=64, description="LoRA rank r.")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha (default: the rank).")
    data: DigitSource = Field("sklearn", description="Bundled digit set (the base's).")
    steps: int = Field(400, ge=1, description="Optimizer steps in all (a resume continues).")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (constant).")
    class_dropout: float = Field(
        0.1, ge=0, lt=1, description="Share of rows trained on the null class (guidance)."
    )
    seed: int = Field(0, ge=0)
    threads: int | None = Field(None, ge=1, description="torch CPU threads.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between resumable checkpoints.")
    command_line: str = Field("skipdit train-adapter", description="Recorded in the card.")


class ClassifierOptions(_Options):
    """``skipdit train-classifier``: the digit classifier that judges generated samples."""

    parse_weight: float = Field(
        1.0,
        ge=0,
        description="text presets: weight of the encoder's scene-parse loss (each stated "
        "digit's token read as its digit, place and size; 0: the denoising loss alone).",
    )
    data: DigitSource = Field("sklearn", description="Bundled digit set.")
    size: int = Field(16, ge=8, le=64, description="Input side in pixels.")
    epochs: int = Field(15, ge=1)
    seed: int = Field(0, ge=0)
    out: Path = Field(CLASSIFIER_DIR, description="Directory to write the classifier to.")


class BenchOptions(_Options):
    """``skipdit bench``: every cache policy at several settings on the shipped models."""

    models: list[str] | None = Field(None, description="Models (default: every shipped one).")
    per_class: int = Field(10, ge=1, description="Images per class and setting.")
    steps: int = Field(50, ge=1, le=1000, description="DDIM steps (class models).")
    intervals: list[int] = Field([2, 3, 4], min_length=1, description="Cache intervals N.")
    thresholds: list[float] = Field(
        [0.05, 0.1, 0.2], min_length=1, description="fbcache thresholds."
    )
    seed: int = Field(0, ge=0)
    prompts: int = Field(
        200, ge=1, description="Text models: held-out prompts per setting (one image each)."
    )
    text_steps: int = Field(25, ge=1, le=1000, description="Text models: flow_euler steps.")
    clip_prompts: int = Field(
        40, ge=1, description="Text-to-video models: held-out motion prompts per setting."
    )
    repeats: int = Field(1, ge=1, description="Timed (setting, uncached) pairs; the median.")
    runs: list[Path] = Field([], description="Training runs whose curves to plot.")
    curve_steps: int = Field(25, ge=1, description="DDIM steps for the training-curve FID.")
    out: Path = Field(Path("docs/bench"), description="Output directory.")
    command_line: str = Field("skipdit bench", description="Recorded in results.md.")


class CalibrateOptions(_Options):
    """``skipdit calibrate-teacache``: fit TeaCache's rescaling polynomial per model and store
    it in the model's card."""

    models: list[str] | None = Field(
        None,
        description="Model names or directories (default: every shipped model); their "
        "config.json gains card.teacache.",
    )
    per_class: int = Field(2, ge=1, le=16, description="Seeded images per class and model.")
    steps: int = Field(50, ge=2, le=1000, description="DDIM steps of each uncached run.")
    seed: int = Field(0, ge=0, description="Seed of class c's run: seed + c.")
    dry_run: bool = Field(False, description="Print the coefficients; write no file.")
    command_line: str = Field("skipdit calibrate-teacache", description="Recorded in the card.")
