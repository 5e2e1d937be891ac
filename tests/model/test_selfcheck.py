"""The fast path checks itself at start (``model.sampling.selfcheck``): a component that raises
or differs from eager torch is turned off, or stops the start where that is asked; a healthy one
stays on. Triton runs in its interpreter on a CPU, at the tiny sizes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import kernels.attention
import kernels.lsc_fusion
from kernels.dispatch import KernelUnavailable
from model.sampling import selfcheck
from model.sampling.graphs import BucketedForward
from model.sampling.pipeline import Pipeline
from service.request import GenerateParams
from tests.helpers import KERNEL_DEVICE, generate, tiny

BUCKETS = (1, 3)
ASK = [GenerateParams(steps=4, seed=3, class_label=5, cache_interval=2)]


def pipeline() -> Pipeline:
    return Pipeline(tiny().to(KERNEL_DEVICE), default_guidance=2.0)


def off_by(factor: float) -> Callable[..., torch.Tensor]:
    real = kernels.lsc_fusion.lsc_fusion

    def wrong(*args: object, **kw: object) -> torch.Tensor:
        return real(*args, **kw) * factor  # type: ignore[arg-type]

    return wrong


def broken(*args: object, **kw: object) -> torch.Tensor:
    raise RuntimeError("illegal memory access (made to fail)")


@pytest.mark.slow
def test_healthy_kernels_pass_and_stay_on() -> None:
    fast = pipeline().use_fast_path(kernels="triton", graphs="off", buckets=BUCKETS)
    (check,) = fast.checks
    assert fast.kernels == "triton" and check.passed and check.component == "kernels"
    assert check.error is not None and check.error <= selfcheck.TOLERANCE[torch.float32]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "fault", "why"),
    [
        ("lsc_fusion", off_by(1.01), "differs from eager torch"),
        ("attention", broken, "raised RuntimeError: illegal memory access"),
    ],
    ids=["lsc differs", "attention raises"],
)
def test_a_failing_kernel_is_turned_off_and_the_pipeline_serves_the_eager_images(
    monkeypatch: pytest.MonkeyPatch, target: str, fault: Callable, why: str
) -> None:
    module = {"lsc_fusion": kernels.lsc_fusion, "attention": kernels.attention}[target]
    monkeypatch.setattr(module, target, fault)
    fused = pipeline()
    fast = fused.use_fast_path(kernels="triton", graphs="off", buckets=BUCKETS)
    (check,) = fast.checks
    assert fast.kernels == "torch" and not check.passed and why in check.reason
    assert fused.model.kernels.backend == "torch"
    (got,) = generate(fused, ASK)
    (want,) = generate(pipeline(), ASK)
    assert torch.equal(got.latents, want.latents)  # the eager path itself


@pytest.mark.slow
def test_fail_stops_the_start_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels.lsc_fusion, "lsc_fusion", off_by(1.01))
    with pytest.raises(KernelUnavailable, match="kernels: self-check failed: differs"):
        pipeline().use_fast_path("triton", "off", buckets=BUCKETS, on_failure="fail")


def test_captured_steps_that_differ_fail_their_check() -> None:
    """The same comparison for captured steps (here the padded eager runner, made to differ)."""
    model = tiny()
    runner = BucketedForward(model, "off", buckets=BUCKETS, depths={1})
    runner.warmup()
    assert selfcheck.check_graphs(runner, 1).passed
    real = runner.full
    runner.full = lambda *a, **k: (real(*a, **k)[0] + 1e-2, {})  # type: ignore[method-assign]
    verdict = selfcheck.check_graphs(runner, 1)
    assert not verdict.passed and "differs from eager torch" in verdict.reason
    assert verdict.error is not None and verdict.error > selfcheck.TOLERANCE[torch.float32]
