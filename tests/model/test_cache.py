"""Skip-Cache's own rule (fixed and adaptive), then each other policy's own, on the image
model. The contract every policy passes, on the image and the video model: test_cache_contract."""

from __future__ import annotations

import math

import pytest
import torch

from model.cache import POLICIES, Mode, RequestCache, build
from model.cache.skip_cache import SkipCacheConfig, SkipCacheState, decide, default_depth
from model.errors import FieldError
from model.networks.skip_dit import preset
from model.sampling.graphs import BucketedForward
from model.sampling.pipeline import Pipeline, denoise_step, forward_group
from service.request import GenerateParams
from tests.helpers import BATCH_TOL, generate, start, tiny
from tests.model.helpers import run_with_modes

# ----------------------------------------------------------------------------- Skip-Cache rule


def test_decide_follows_the_papers_rule() -> None:
    cfg = SkipCacheConfig(interval=3, depth=1, t_start=900, t_end=50)
    empty, warm = SkipCacheState(), SkipCacheState(deep=torch.zeros(1))
    assert decide(1, 500, cfg, empty) is Mode.FULL  # nothing cached yet
    assert decide(3, 500, cfg, warm) is Mode.FULL  # step % N == 0
    assert decide(4, 500, cfg, warm) is Mode.CACHED
    assert decide(4, 900, cfg, warm) is Mode.FULL  # t >= t_start
    assert decide(4, 50, cfg, warm) is Mode.FULL  # t <= t_end
    assert decide(4, 51, cfg, warm) is Mode.CACHED


def test_defaults_scale_the_papers_depth_to_the_model() -> None:
    assert default_depth(preset("XL/2")) == 4
    assert default_depth(preset("digits-small")) == 1
    cfg = POLICIES["skip_cache"].default_config(preset("XL/2"), interval=2)
    assert (cfg.depth, cfg.t_start, cfg.t_end) == (4, math.inf, 20.0)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"interval": 0}, "interval"),
        ({"depth": 3}, "depth"),
        ({"t_start": 10.0, "t_end": 20.0}, "t_end"),
        ({"threshold": 1.5}, "threshold"),
    ],
)
def test_bad_skip_cache_options_name_the_parameter(options: dict, field: str) -> None:
    with pytest.raises(FieldError) as err:
        build("skip_cache", preset("digits-tiny"), **options)
    assert err.value.field == field


def test_planned_modes_match_what_a_run_does(tiny_pipeline: Pipeline) -> None:
    job = start(tiny_pipeline, GenerateParams(steps=8, cache_interval=3))
    timesteps = [int(t) for t in job.scheduler.timesteps]
    planned = job.cache.policy.planned_modes(job.cache.config, timesteps)
    ran = [denoise_step(tiny_pipeline.model, [job])[0] for _ in timesteps]
    assert planned == ran and Mode.CACHED in ran


# ----------------------------------------------------------------------------- adaptive


def _adaptive(threshold: float | None, seed: int = 5, label: int = 3, **kw: object):
    return GenerateParams(steps=10, num_images=2, class_label=label, seed=seed,
                          cache_interval=4, cache_threshold=threshold, **kw)  # fmt: skip


def test_adaptive_skip_cache_at_threshold_0_is_no_cache(tiny_pipeline: Pipeline) -> None:
    (adaptive,), (modes,) = run_with_modes(tiny_pipeline, [_adaptive(0.0)])
    assert modes == [Mode.FULL] * 10  # every would-be cached step recomputed
    uncached = GenerateParams(steps=10, num_images=2, class_label=3, seed=5, cache_policy="none")
    (reference,) = generate(tiny_pipeline, [uncached])
    torch.testing.assert_close(adaptive, reference.latents, **BATCH_TOL)


def test_adaptive_skip_cache_without_a_threshold_is_the_fixed_schedule(
    tiny_pipeline: Pipeline,
) -> None:
    not_given = GenerateParams(steps=10, num_images=2, class_label=3, seed=5, cache_interval=4)
    (fixed,), (fixed_modes,) = run_with_modes(tiny_pipeline, [not_given])
    (unset,), _ = run_with_modes(tiny_pipeline, [_adaptive(None)])
    # A threshold no change reaches takes the adaptive forward and never refreshes: same bits.
    (never,), (never_modes,) = run_with_modes(tiny_pipeline, [_adaptive(1.0)])
    assert torch.equal(unset, fixed) and torch.equal(never, fixed)
    assert never_modes == fixed_modes and fixed_modes.count(Mode.CACHED) == 6
    # An infinite threshold (a config value; requests stop at 1) is the same bits too.
    policy = POLICIES["skip_cache"]
    config = policy.default_config(tiny_pipeline.model.config, interval=4, threshold=math.inf)
    job = start(tiny_pipeline, _adaptive(0.5))
    job.cache = RequestCache(policy, config)
    while not job.done:
        tiny_pipeline.step([job])
    assert job.cache.state.threshold == math.inf and torch.equal(job.latents, fixed)


def test_adaptive_skip_cache_plans_every_step_full(tiny_pipeline: Pipeline) -> None:
    """Its refreshes depend on the run: the plan is the upper bound, as fbcache's."""
    job = start(tiny_pipeline, _adaptive(0.05))
    timesteps = [int(t) for t in job.scheduler.timesteps]
    assert job.cache.policy.planned_modes(job.cache.config, timesteps) == [Mode.FULL] * 10
    ran = [denoise_step(tiny_pipeline.model, [job])[0] for _ in timesteps]
    assert Mode.CACHED in ran


def test_adaptive_skip_cache_keeps_the_interval_as_the_largest_gap(
    tiny_pipeline: Pipeline,
) -> None:
    requests = [_adaptive(th, seed=s, label=s) for s, th in ((1, 0.05), (2, 0.2), (3, 0.5))]
    together, modes = run_with_modes(tiny_pipeline, requests)
    for m in modes:
        full = [i for i, mode in enumerate(m) if mode is Mode.FULL]
        assert set(range(0, 10, 4)) <= set(full)
    refreshed = [sum(mode is Mode.FULL for mode in m) - 3 for m in modes]
    assert refreshed[0] > refreshed[2] and refreshed[0] > 0  # lower thresholds refresh more
    # Batched with other thresholds, each request runs as it runs alone.
    for params, batched, batched_modes in zip(requests, together, modes, strict=True):
        (alone,), (alone_modes,) = run_with_modes(tiny_pipeline, [params])
        assert batched_modes == alone_modes
        torch.testing.assert_close(batched, alone, **BATCH_TOL)


def test_adaptive_cached_forward_splits_rows_after_block_k(tiny_pipeline: Pipeline) -> None:
    """Stale request A (threshold 0) and fresh request B (threshold 1) in one cached forward:
    blocks 0..K-1 and D-K..D-1 run on all rows, the middle blocks on A's rows only, once; A's
    deep feature becomes what a full step at these inputs captures, B's stays."""
    model = tiny_pipeline.model
    d, policy = model.config.depth, POLICIES["skip_cache"]
    k = default_depth(model.config)
    configs = [policy.default_config(model.config, interval=4, threshold=th) for th in (0, 1)]
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    t, y = torch.tensor([600, 600, 600]), torch.tensor([1, 1, 4])
    keys = policy.capture_blocks(configs[0], model.config)
    assert keys == (k, d - k)
    with torch.no_grad():
        _, before = model.capturing(x0, t, y, keys)
        full, after = model.capturing(x1, t, y, keys)
    states = [policy.new_state(), policy.new_state()]
    for state, config, rows in zip(states, configs, (slice(0, 2), slice(2, 3)), strict=True):
        policy.on_full(config, state, {key: v[rows] for key, v in before.items()})
    assert policy.state_bytes(states[0]) == 2 * 2 * 16 * 32 * 4  # deep + shallow, 2 rows
    ran: list[tuple[int, int]] = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: ran.append((i, o.shape[0])))
               for i, b in enumerate(model.blocks)]  # fmt: skip
    try:
        with torch.no_grad():
            out = policy.run_cached(model, x1, t, y, configs[1], states)
    finally:
        for h in handles:
            h.remove()
    middle = range(k, d - k)
    expected = [(i, 3) for i in range(k)] + [(i, 2) for i in middle]
    assert ran == expected + [(i, 3) for i in range(d - k, d)]
    modes = [policy.realized_mode(s, Mode.CACHED) for s in states]
    assert modes == [Mode.FULL, Mode.CACHED]
    torch.testing.assert_close(states[0].deep, after[d - k][:2], **BATCH_TOL)
    torch.testing.assert_close(out[:2], full[:2], **BATCH_TOL)  # A: a full step's output
    assert torch.equal(states[1].deep, before[d - k][2:])


def test_adaptive_groups_run_eagerly_beside_captured_steps() -> None:
    """A captured-step runner has neither the row split nor block K's capture: adaptive groups
    go eager, the rest through the runner, and every request makes the eager result."""
    eager = Pipeline(tiny(), default_guidance=2.0)
    fast = Pipeline(tiny(), default_guidance=2.0)
    runner = BucketedForward(fast.model, "off", buckets=(1, 2, 4), depths={1})
    runner.warmup()
    fast.forward = runner.group_forward(forward_group)  # adaptive steps: declared eager
    requests = [_adaptive(0.1, seed=1), _adaptive(None, seed=2), _adaptive(0.3, seed=3)]
    for a, b in zip(generate(eager, requests), generate(fast, requests), strict=True):
        torch.testing.assert_close(b.latents, a.latents, **BATCH_TOL)


# ----------------------------------------------------------------------------- the others


def test_fbcache_decides_per_request_from_its_own_rows(tiny_pipeline: Pipeline) -> None:
    model = tiny_pipeline.model
    policy = POLICIES["fbcache"]
    config = policy.default_config(model.config, threshold=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g)
    t, y = torch.tensor([500, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        _, captured = model.capturing(x, t, y, policy.capture_blocks(config, model.config))
    still, moved = policy.new_state(), policy.new_state()
    policy.on_full(config, still, {k: v[:1] for k, v in captured.items()})
    policy.on_full(config, moved, {k: v[1:] * 3 for k, v in captured.items()})  # far from now
    with torch.no_grad():
        together = policy.run_cached(model, x, t, y, config, [still, moved])
    assert (still.last_mode, moved.last_mode) == (Mode.CACHED, Mode.FULL)
    assert policy.realized_mode(moved, Mode.CACHED) is Mode.FULL
    with torch.no_grad():
        full = model(x, t, y)
    # The reused request reproduces its stored residual exactly; the moved one computed fully.
    torch.testing.assert_close(together, full, **BATCH_TOL)


def test_delta_dit_skips_the_rear_range_early_and_the_front_range_late(
    tiny_pipeline: Pipeline,
) -> None:
    model = tiny_pipeline.model
    d = model.config.depth
    policy = POLICIES["delta_dit"]
    config = policy.default_config(model.config, blocks=1, boundary=500)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([900, 100]), torch.tensor([3, 3])
    with torch.no_grad():
        full, captured = model.capturing(x, t, y, policy.capture_blocks(config, model.config))
    states = [policy.new_state(), policy.new_state()]
    for i, state in enumerate(states):
        policy.on_full(config, state, {k: v[i : i + 1] for k, v in captured.items()})
    ran: list[tuple[int, int]] = []
    handles = [
        b.register_forward_hook(lambda m, a, o, k=k: ran.append((k, o.shape[0])))
        for k, b in enumerate(model.blocks)
    ]
    try:
        with torch.no_grad():
            cached = policy.run_cached(model, x, t, y, config, states)
    finally:
        for h in handles:
            h.remove()
    assert ran == [(k, 1) for k in range(d - 1)] + [(k, 1) for k in range(1, d)]
    # Same inputs as the stored full step: the deviations reproduce it.
    torch.testing.assert_close(cached, full, **BATCH_TOL)


def test_toca_recomputes_a_ratio_of_tokens_and_refreshes_them_in_turn(
    tiny_pipeline: Pipeline,
) -> None:
    model = tiny_pipeline.model
    tokens = model.config.num_tokens  # 16
    shapes: list[tuple[int, ...]] = []
    handle = model.blocks[0].mlp.register_forward_hook(
        lambda m, a, o: shapes.append(tuple(a[0].shape))
    )
    params = GenerateParams(steps=9, guidance_scale=1, cache_policy="toca", cache_interval=5,
                            cache_ratio=0.25)  # fmt: skip
    job = start(tiny_pipeline, params)
    refreshed = torch.zeros(tokens, dtype=torch.long)
    try:
        denoise_step(model, [job])  # full
        for _ in range(4):  # cached: 4 tokens each, stalest first
            assert denoise_step(model, [job])[0] is Mode.CACHED
            refreshed += (job.cache.state.staleness[0] == 0).long()
    finally:
        handle.remove()
    assert shapes == [(1, tokens, 32)] + [(1, 4, 32)] * 4
    assert refreshed.tolist() == [1] * tokens  # every token exactly once in 4 cached steps
