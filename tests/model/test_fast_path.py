"""The pipeline's fast path: kernel backend and captured steps chosen per device, routed per
step group; on a CPU it stays plain eager torch, and every path gives the eager results."""

from __future__ import annotations

import pytest
import torch

from kernels.dispatch import KernelUnavailable
from model.sampling.graphs import BucketedForward, ModeUnavailable
from model.sampling.pipeline import Pipeline, forward_group
from service.request import GenerateParams
from tests.helpers import BATCH_TOL, KERNEL_DEVICE, generate, tiny

MIXED = [
    GenerateParams(steps=6, seed=1, class_label=2, cache_interval=2),  # skip_cache: graphed
    GenerateParams(steps=6, seed=2, class_label=5, num_images=3, cache_interval=1),
    GenerateParams(steps=5, seed=3, class_label=7, cache_policy="none", sampler="ddpm"),
    GenerateParams(steps=6, seed=4, class_label=1, cache_policy="fora", cache_interval=2),
    GenerateParams(steps=6, seed=5, class_label=3, cache_interval=3, cache_depth=2),  # eager
]


def latents(pipeline: Pipeline) -> list[torch.Tensor]:
    return [r.latents for r in generate(pipeline, MIXED)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_auto_on_a_cpu_is_plain_eager_torch() -> None:
    pipeline = Pipeline(tiny(), default_guidance=2.0)
    fast = pipeline.use_fast_path()
    assert (fast.kernels, fast.graphs, fast.warmup_seconds) == ("torch", "off", 0.0)
    assert pipeline.forward is forward_group and pipeline.model.kernels.backend == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")
def test_an_explicit_path_that_cannot_run_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = Pipeline(tiny(), default_guidance=2.0)
    with pytest.raises(ModeUnavailable, match="cuda_graphs"):
        pipeline.use_fast_path(graphs="cuda_graphs")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelUnavailable, match="triton"):
        pipeline.use_fast_path(kernels="triton")


def test_bucketed_steps_route_per_group_and_equal_eager() -> None:
    """Padded buckets (mode off: the same padding the graphs replay) for none and Skip-Cache
    at the prepared depth; FORA and another depth fall back to eager, in the same steps."""
    eager = Pipeline(tiny(), default_guidance=2.0)
    bucketed = Pipeline(tiny(), default_guidance=2.0)
    runner = BucketedForward(bucketed.model, "off", buckets=(1, 2, 4), depths={1})
    runner.warmup()
    calls = {"runner": 0, "eager": 0}

    def counted_eager(*args: object) -> object:
        calls["eager"] += 1
        return forward_group(*args)  # type: ignore[arg-type]

    routed = runner.group_forward(counted_eager)

    def forward(*args: object) -> object:
        calls["runner"] += 1
        return routed(*args)

    bucketed.forward = forward  # type: ignore[assignment]
    for got, want in zip(latents(bucketed), latents(eager), strict=True):
        torch.testing.assert_close(got, want, **BATCH_TOL)
    assert calls["eager"] > 0 and calls["runner"] > calls["eager"]


def test_triton_kernels_give_the_torch_networks_full_and_cached_forwards() -> None:
    """Both kernels (LSC fusion, attention) in the network: on the GPU where there is one (the
    interpreter is off there), else in Triton's interpreter on this CPU."""
    plain, fused = tiny().to(KERNEL_DEVICE), tiny().to(KERNEL_DEVICE)  # same seed: same weights
    assert fused.use_kernels("triton") == "triton" and plain.use_kernels("torch") == "torch"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 8, 8, generator=g).to(KERNEL_DEVICE)
    t = torch.tensor([999, 500, 250, 10, 0], device=KERNEL_DEVICE)
    y = torch.tensor([0, 3, 9, 10, 1], device=KERNEL_DEVICE)  # 10: the null class
    deep_key = plain.config.depth - 1
    with torch.no_grad():
        want, want_captured = plain.capturing(x, t, y, {deep_key})
        got, got_captured = fused.capturing(x, t, y, {deep_key})
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_captured[deep_key], want_captured[deep_key])
        deep = want_captured[deep_key]
        torch.testing.assert_close(
            fused.forward_cached(x, t, y, deep, 1),
            plain.forward_cached(x, t, y, deep, 1),
            rtol=1e-5,
            atol=1e-5,
        )


@pytest.mark.slow
def test_a_pipeline_on_triton_kernels_makes_the_eager_images() -> None:
    """On the GPU where there is one, else in Triton's interpreter on this CPU."""
    eager = Pipeline(tiny().to(KERNEL_DEVICE), default_guidance=2.0)
    fused = Pipeline(tiny().to(KERNEL_DEVICE), default_guidance=2.0)
    assert fused.use_fast_path(kernels="triton", graphs="off").kernels == "triton"
    for got, want in zip(latents(fused), latents(eager), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the full-size check needs a GPU")
def test_full_size_fast_paths_match_the_fp32_reference_on_a_gpu() -> None:
    """Skip-DiT-XL/2 in bf16, 16 rows: the Triton kernels and the CUDA-graph replays are within
    twice the eager bf16 network's own error against the same network in fp32."""
    from model.networks.skip_dit import SkipDiT, preset

    torch.manual_seed(0)
    network = SkipDiT(preset("XL/2"))
    with torch.no_grad():
        for p in network.parameters():
            if not p.any():
                p.normal_(std=0.02)
    reference = network.to("cuda").eval()
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(16, 4, 32, 32, device="cuda", generator=g)
    t = torch.randint(0, 1000, (16,), device="cuda", generator=g)
    y = torch.randint(0, 1001, (16,), device="cuda", generator=g)
    with torch.no_grad():
        want = reference(x, t, y).float()
        bf16 = SkipDiT(reference.config).to("cuda", torch.bfloat16).eval()
        bf16.load_state_dict(reference.state_dict())
        eager_err = (bf16(x.bfloat16(), t, y).float() - want).abs().max().item()
        bf16.use_kernels("triton")
        triton_err = (bf16(x.bfloat16(), t, y).float() - want).abs().max().item()
        runner = BucketedForward(bf16, "cuda_graphs", buckets=(16,), depths={4})
        runner.warmup()
        graph_err = (runner.full(x.bfloat16(), t, y)[0].float() - want).abs().max().item()
    assert triton_err <= 2 * eager_err and graph_err <= 2 * eager_err, (
        eager_err, triton_err, graph_err,
    )  # fmt: skip
