"""Shared fixtures: small real networks with non-trivial weights."""

from __future__ import annotations

import os

import torch

# No GPU: Triton kernels run in Triton's CPU interpreter. Triton reads this when it is first
# imported, and importing diffusers (model.sampling.pipeline, below) imports it: set it before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from model.networks.skip_dit import SkipDiT, preset
from model.sampling.pipeline import Pipeline

# Batched vs solo at fp32: GEMMs of different batch sizes round differently (~1 ulp per op);
# over tens of steps that reaches ~1e-5. Far below any visible change (1/255 ~ 4e-3).
BATCH_TOL = {"rtol": 1e-4, "atol": 1e-4}


def randomized(model: SkipDiT, seed: int = 0, scale: float = 0.05) -> SkipDiT:
    """Perturb every trainable weight so that adaLN-Zero's zero init does not make blocks the
    identity (an untouched fresh DiT outputs exactly zero, which would hide cache bugs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def tiny(seed: int = 0, **overrides: object) -> SkipDiT:
    torch.manual_seed(seed)
    return randomized(SkipDiT(preset("digits-tiny", **overrides)), seed)


@pytest.fixture(scope="session")
def tiny_model() -> SkipDiT:
    """Skip-DiT, depth 4, hidden 32, 8x8 pixels, 10 classes, null class for guidance."""
    return tiny()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model: SkipDiT) -> Pipeline:
    return Pipeline(tiny_model, default_guidance=2.0)
