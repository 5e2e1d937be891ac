"""DyDiT on our networks: routers that keep everything are the base network bit for bit, the
sliced and gathered inference path equals the masked training path, the FLOPs model equals a
FlopCounterMode count, and a request's output never depends on its batch-mates."""

from __future__ import annotations

import pytest
import torch

from model import cache
from model.errors import FieldError
from model.networks import flops
from model.networks.dydit import DyDiT, Routed, flop_model
from model.networks.presets import build, preset
from model.networks.skip_dit import SkipDiT
from model.sampling.pipeline import Pipeline
from model.sampling.plan import plan
from service.request import GenerateParams
from tests.helpers import generate, start, tiny
from tests.model.helpers import routing

ATOL = 1e-5  # fp32: a row computed in a different batch (BLAS blocking)


def trained_like(long_skip: bool, seed: int = 0) -> SkipDiT:
    """A tiny network with non-trivial weights (adaLN-Zero's zeros would hide everything)."""
    torch.manual_seed(seed)
    model = build(preset("digits-tiny", long_skip=long_skip)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 1, 8, 8, generator=g)
    t = torch.linspace(999, 0, n).long()
    y = torch.arange(n) % 11  # 10: the null class
    return x, t, y


@pytest.mark.parametrize("long_skip", [True, False], ids=["skip-dit", "dit"])
def test_routers_that_keep_everything_are_the_base_network_bitwise(long_skip: bool) -> None:
    base = trained_like(long_skip)
    dy = DyDiT.from_base(base).eval()
    x, t, y = batch()
    with torch.no_grad():
        assert torch.equal(dy(x, t, y), base(x, t, y))
        if long_skip:
            deep = torch.randn(6, 16, 32)
            assert torch.equal(
                dy.forward_cached(x, t, y, deep, 1), base.forward_cached(x, t, y, deep, 1)
            )
    requests = [GenerateParams(class_label=c, steps=4, seed=c, guidance_scale=2.0,
                               cache_policy="none") for c in range(4)]  # fmt: skip
    ours = [r.latents for r in generate(Pipeline(dy), requests)]
    theirs = [r.latents for r in generate(Pipeline(base), requests)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_a_fine_tune_starts_from_the_base_weights_and_keeps_every_router_key() -> None:
    base = trained_like(True)
    dy = DyDiT.from_base(base)
    routers = {k for k in dy.state_dict() if k not in base.state_dict()}
    assert routers and all(".attn_rate.router." in k or ".mlp_rate.router." in k
                           or ".token_selection.mlp_head." in k for k in routers)  # fmt: skip
    assert dy.blocks[0].attn_rate.router.weight.shape == (1, 32)  # H - 1 switchable heads
    with pytest.raises(ValueError, match="static base"):
        DyDiT.from_base(dy)


def test_sliced_and_gathered_inference_equals_the_masked_training_path() -> None:
    block = routing(DyDiT.from_base(trained_like(True))).blocks[1].eval()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 16, 32, generator=g)
    heads = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0], [1, 1]], dtype=torch.bool)
    tokens = torch.rand(5, 16, generator=g) > 0.4
    with torch.no_grad():
        sliced = block.routed_attention(h, heads)
        gathered = block.routed_mlp(h, heads, tokens)  # 2 groups, as many as heads
        block.train()  # the dense, multiplied path (no randomness below the routers)
        masked = block.routed_attention(h, heads.float())
        dense = block.routed_mlp(h, heads.float(), tokens.float())
    assert torch.allclose(sliced, masked, atol=ATOL)
    assert torch.allclose(gathered, dense, atol=ATOL)
    assert torch.equal(gathered[~tokens], torch.zeros_like(gathered[~tokens]))


@pytest.mark.parametrize("long_skip", [True, False], ids=["skip-dit", "dit"])
def test_the_flop_model_equals_a_flop_count_of_each_row(long_skip: bool) -> None:
    dy = routing(DyDiT.from_base(trained_like(long_skip))).eval()
    x, t, y = batch()
    model = flop_model(dy)
    with torch.no_grad():
        _, captured = dy.capturing(x, t, y, dy.usage_capture())
        ratios = model.ratio(dy.usage(captured))
        base = flops.count(lambda: dy.dense()(x[:1], t[:1], y[:1]))
        counted = [flops.count(lambda i=i: dy(x[i:i + 1], t[i:i + 1], y[i:i + 1])) / base
                   for i in range(len(t))]  # fmt: skip
    assert model.base == base
    assert torch.allclose(ratios.double(), torch.tensor(counted, dtype=torch.float64), rtol=1e-6)
    assert len(set(counted)) > 1 and max(counted) < 1  # the rows really were routed apart


def test_routing_reads_the_timestep_only() -> None:
    dy = routing(DyDiT.from_base(trained_like(True))).eval()
    t = torch.tensor([500, 500, 100])
    c = dy.condition(t, torch.tensor([1, 7, 1]))
    assert isinstance(c, Routed) and isinstance(c[1:], Routed) and c[1:].c.shape == (2, 32)
    heads = dy.blocks[0].attn_rate(c.t_emb, False)  # (3, H)
    assert torch.equal(heads[0], heads[1]) and bool(heads[:, 0].all())


def test_a_request_gives_the_same_output_in_a_mixed_batch_as_alone() -> None:
    """Rows at different timesteps (different masks), with and without guidance, dynamic and
    static requests, several cache policies: each equals its run alone."""
    dy = routing(DyDiT.from_base(trained_like(True)))
    pipeline = Pipeline(dy)
    requests = [
        GenerateParams(class_label=1, steps=6, seed=1, cache_policy="none"),
        GenerateParams(class_label=2, steps=9, seed=2, guidance_scale=2.0, cache_policy="none"),
        GenerateParams(class_label=3, steps=6, seed=3, cache_interval=2),
        GenerateParams(class_label=4, steps=7, seed=4, dynamic=False, cache_policy="none"),
        GenerateParams(class_label=5, steps=8, seed=5, cache_policy="teacache",
                       cache_threshold=0.05),
        GenerateParams(class_label=6, steps=8, seed=6, cache_policy="fora", cache_interval=2),
    ]  # fmt: skip
    together = generate(pipeline, requests)
    for request, result in zip(requests, together, strict=True):
        alone = generate(pipeline, [request])[0]
        assert torch.allclose(result.latents, alone.latents, atol=ATOL), request


def test_dynamic_false_runs_the_same_weights_without_routing() -> None:
    dy = routing(DyDiT.from_base(trained_like(True)))
    static = build(dy.config.replace(dynamic=False))
    static.load_state_dict(dy.dense().state_dict(), strict=False)
    request = GenerateParams(class_label=3, steps=5, seed=9, dynamic=False, cache_policy="none")
    ours = generate(Pipeline(dy), [request])[0].latents
    plain = request.model_copy(update={"dynamic": None})  # a static model takes no `dynamic`
    assert torch.equal(ours, generate(Pipeline(static), [plain])[0].latents)
    routed = generate(Pipeline(dy), [request.model_copy(update={"dynamic": True})])[0].latents
    assert not torch.allclose(ours, routed)


@pytest.mark.parametrize("policy", sorted(set(cache.POLICIES) - {"none"}))
def test_every_cache_policy_caches_steps_on_a_dydit(policy: str) -> None:
    """Routed, each policy that applies caches the steps its rule gives (a dynamic one: some,
    at a threshold this network's changes stay under). Quality on a trained DyDiT is
    ``tests/model/test_quality_floors.py``'s; the structure of a cached step on a DyDiT is
    ``tests/model/test_cache_structure.py``'s."""
    dy = routing(DyDiT.from_base(tiny()))  # small weights: block 0's output moves slowly
    dynamic = policy in ("fbcache", "teacache")
    options = {"cache_threshold": 1.0} if dynamic else {"cache_interval": 2}
    request = GenerateParams(class_label=2, steps=6, seed=2, cache_policy=policy, **options)
    if not cache.POLICIES[policy].applies_to(dy.config):  # ToCa: see its refusal
        with pytest.raises(FieldError, match="routed DyDiT") as refused:
            generate(Pipeline(dy), [request])
        assert refused.value.field == "cache_policy"
        request = request.model_copy(update={"dynamic": False})  # the static twin runs it
    job = start(Pipeline(dy), request)
    planned = job.cache.policy.planned_modes(job.cache.config, job.scheduler.timesteps.tolist())
    result = generate(Pipeline(dy), [request])[0]
    assert torch.isfinite(result.latents).all()
    cached = result.stats.steps[cache.Mode.CACHED]
    assert cached >= 2 if dynamic else cached == planned.count(cache.Mode.CACHED) >= 2


def test_dynamic_is_refused_on_a_model_without_routers() -> None:
    with pytest.raises(FieldError) as refused:
        plan(preset("digits-tiny"), dynamic=True)
    assert refused.value.field == "dynamic"
    assert not plan(preset("digits-tiny", dynamic=True), dynamic=False).dynamic
    with pytest.raises(ValueError, match="dynamic"):
        preset("digits-video-tiny", dynamic=True)
