"""The contract every cache policy passes on every model it applies to: the tiny image model
(Skip-DiT ``digits-tiny``) and the tiny video model (Skip-Latte ``digits-video-tiny``), each with
the policies ``POLICIES[name].applies_to`` its config. Caching turned off is no cache, bit for
bit; a request batched with another runs as it runs alone; a fresh state holds nothing; the
planned modes are what a run reports; each policy's store is the size it reports; Skip-Cache's
cached step runs 2K units on the request's own deep feature; FORA's cached step computes no
attention and no MLP. What only one kind of model has stays in test_cache.py (image) and
test_skip_latte.py (video)."""

from __future__ import annotations

import pytest
import torch

from model.cache import POLICIES, Mode
from model.cache.skip_cache import default_depth
from model.networks import presets
from model.sampling.pipeline import Pipeline, denoise_step
from service.request import FIELDS, GenerateParams
from tests.helpers import BATCH_TOL, generate, start, tiny_video

# The models the contract runs on, by kind: the configs of the pipelines below.
CONFIGS: dict[str, presets.Config] = {
    "image": presets.preset("digits-tiny"),
    "video": presets.preset("digits-video-tiny"),
}
# policy -> request options that make it cache (for "none": nothing to set).
CACHING = {
    "none": {},
    "skip_cache": {"cache_interval": 3},
    "fora": {"cache_interval": 3},
    "fbcache": {"cache_threshold": 0.5},
    "delta_dit": {"cache_interval": 2},
    "toca": {"cache_interval": 3, "cache_ratio": 0.5},
    "teacache": {"cache_threshold": 0.5},
}
CACHING_ON = {
    "image": CACHING,
    # fbcache at the image's 0.5 reuses one residual for 6 of 8 steps on this random video
    # network (its first pair's output moves little); 0.2 caches 4.
    "video": CACHING | {"fbcache": {"cache_threshold": 0.2}},
}
# policy -> request options that turn its caching off.
OFF = {
    "none": {},
    "skip_cache": {"cache_interval": 1},
    "fora": {"cache_interval": 1},
    "fbcache": {"cache_threshold": 0},
    "delta_dit": {"cache_interval": 1},
    "toca": {"cache_interval": 1},
    "teacache": {"cache_threshold": 0},
}
# Policies whose modes depend on the run itself: their planned_modes is an estimate. (Adaptive
# Skip-Cache too: see test_cache.py's test_adaptive_skip_cache_plans_every_step_full.)
DYNAMIC = {"fbcache", "teacache"}
# Request options the planning contract tries; each policy takes its own (service.request.FIELDS).
# (cache_threshold alone: skip_cache runs it at its default interval, adaptive.)
PLAN_OPTIONS = [
    {"cache_interval": 3, "cache_ratio": 0.5},
    {"cache_threshold": 0.5},
    {"cache_interval": 2, "cache_t_start": 700, "cache_t_end": 300},
    {"cache_interval": 4, "cache_depth": 2, "cache_t_end": 150},
]
PLAN_RUNS = [("ddim", 10), ("ddpm", 13), ("dpm++", 7)]  # (sampler, steps)
# (kind, policy): every policy on every model kind it applies to.
CASES = [
    pytest.param(kind, name, id=f"{kind}-{name}")
    for kind, config in CONFIGS.items()
    for name in sorted(POLICIES)
    if POLICIES[name].applies_to(config)
]
KINDS = sorted(CONFIGS)


@pytest.fixture(scope="module")
def tiny_video_pipeline() -> Pipeline:
    """Skip-Latte, 4 pairs, hidden 32, 4 frames of 8x8 pixels, null class for guidance."""
    return Pipeline(tiny_video(), default_guidance=2.0)


@pytest.fixture
def pipeline(kind: str, request: pytest.FixtureRequest) -> Pipeline:
    """The tiny pipeline of this ``kind`` of model (session's image, module's video)."""
    pipeline = request.getfixturevalue(f"tiny_{'' if kind == 'image' else 'video_'}pipeline")
    assert pipeline.model.config == CONFIGS[kind]
    return pipeline


def test_every_policy_is_covered_by_the_contract() -> None:
    assert set(CACHING) == set(OFF) == set(POLICIES)
    assert set(POLICIES) >= DYNAMIC
    assert {name for _, name in (case.values for case in CASES)} == set(POLICIES)


def _run(pipeline: Pipeline, **kw: object) -> torch.Tensor:
    params = GenerateParams(steps=8, num_images=2, class_label=3, seed=5, **kw)
    (result,) = generate(pipeline, [params])
    return result.latents


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_caching_off_is_bitwise_no_cache(pipeline: Pipeline, name: str) -> None:
    reference = _run(pipeline, cache_policy="none")
    assert torch.equal(_run(pipeline, cache_policy=name, **OFF[name]), reference)


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_state_of_two_requests_never_mixes(pipeline: Pipeline, kind: str, name: str) -> None:
    caching = CACHING_ON[kind][name]
    a = GenerateParams(steps=8, seed=1, class_label=1, cache_policy=name, **caching)
    b = GenerateParams(steps=8, seed=2, class_label=7, cache_policy=name, **caching)
    together = generate(pipeline, [a, b])
    for params, batched in zip([a, b], together, strict=True):
        (alone,) = generate(pipeline, [params])
        torch.testing.assert_close(batched.latents, alone.latents, **BATCH_TOL)


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_state_reset_forgets_the_cache(pipeline: Pipeline, kind: str, name: str) -> None:
    params = GenerateParams(steps=4, cache_policy=name, **CACHING_ON[kind][name])
    job = start(pipeline, params)
    denoise_step(pipeline.model, [job])
    job.cache.reset()
    assert job.cache.policy.state_bytes(job.cache.state) == 0
    assert job.cache.decide(1, 500) is Mode.FULL


def _plan_and_run(pipeline: Pipeline, params: GenerateParams) -> tuple[list[Mode], list[Mode]]:
    """A fresh request's planned modes, and the modes a real run of it reports step by step."""
    job = start(pipeline, params)
    planned = job.cache.policy.planned_modes(
        job.cache.config, [int(t) for t in job.scheduler.timesteps]
    )
    ran: list[Mode] = []
    generate(pipeline, [params], progress=lambda _job, mode: ran.append(mode))
    return planned, ran


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_planned_modes_are_what_a_run_reports(pipeline: Pipeline, name: str) -> None:
    """Static policies plan exactly; a dynamic one plans every step FULL, an upper bound on time
    (its 'cached' steps may compute fully)."""
    fields = FIELDS[name]
    settings = {tuple((k, v) for k, v in o.items() if k in fields) for o in PLAN_OPTIONS}
    seen: set[Mode] = set()
    for options in sorted(settings):
        for sampler, steps in PLAN_RUNS:
            params = GenerateParams(
                steps=steps, sampler=sampler, seed=3, cache_policy=name, **dict(options)
            )
            planned, ran = _plan_and_run(pipeline, params)
            assert len(ran) == steps
            adaptive = name in DYNAMIC or "cache_threshold" in dict(options)  # skip_cache's too
            expected = [Mode.FULL] * steps if adaptive else ran
            assert planned == expected, (options, sampler)
            seen.update(ran)
    assert name == "none" or Mode.CACHED in seen  # the schedules tried really cache


@pytest.mark.parametrize("kind", KINDS)
def test_each_policy_reports_the_memory_its_cache_holds(pipeline: Pipeline, kind: str) -> None:
    config = pipeline.model.config
    one_hidden = 2 * config.num_tokens * config.hidden_size * 4  # 2 rows (guidance), fp32
    held = {}
    for name in (n for k, n in (case.values for case in CASES) if k == kind):
        params = GenerateParams(steps=4, cache_policy=name, **CACHING_ON[kind][name])
        job = start(pipeline, params)
        denoise_step(pipeline.model, [job])
        held[name] = job.cache.policy.state_bytes(job.cache.state)
    expected = {
        "none": 0,
        "skip_cache": one_hidden,
        "fora": 2 * config.depth * one_hidden,
        "fbcache": 2 * one_hidden,
        "delta_dit": (1 + 1 + 1 + 1) * one_hidden,  # n=1: enter 0, enter 1, enter D-1, final
        "toca": 2 * config.depth * one_hidden,  # + per-token staleness counters
        "teacache": 2 * one_hidden,  # block 0's modulated input, the block stack's residual
    }
    assert held == {name: expected[name] for name in held}


@pytest.mark.parametrize("kind", KINDS)
def test_skip_cache_cached_step_runs_2k_units_on_the_requests_own_deep_feature(
    pipeline: Pipeline,
) -> None:
    """A cached step runs units (blocks; pairs of blocks on video) 0..K-1 and U-K..U-1 only,
    and the main path entering unit U-K's fusion is the request's own hidden state from its last
    full step: two requests of other intervals in one batch, told apart by their row counts."""
    model = pipeline.model
    units, hidden, frames = model.config.units, model.config.hidden_size, model.config.num_frames
    per_unit = len(model.blocks) // units  # 1 block per unit on images, 2 (a pair) on video
    k = default_depth(model.config)
    j = (units - k) - units // 2  # the fusion in front of unit U-K
    events: list[tuple] = []
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: events.append(("block", i)))
        for i, block in enumerate(model.blocks)
    ]
    handles.append(  # the main path entering the fusion, (B, F, T, D) (F = 1 on images)
        model.skip_norms[j].register_forward_pre_hook(
            lambda m, a: events.append(("fuse", a[0][..., :hidden].unflatten(0, (-1, frames))))
        )
    )
    # A: 1 row, interval 2; B: 2 rows, interval 3. Row counts tell their forwards apart.
    a = start(pipeline, GenerateParams(steps=8, guidance_scale=1, cache_interval=2, seed=1))
    b = start(
        pipeline,
        GenerateParams(steps=8, guidance_scale=1, num_images=2, cache_interval=3, seed=2),
    )
    full = list(range(len(model.blocks)))
    cached = [*full[: k * per_unit], *full[(units - k) * per_unit :]]  # exactly 2K of U units
    last_full: dict[str, torch.Tensor] = {}
    checked = {"a": 0, "b": 0}
    try:
        while not a.done:
            events.clear()
            modes = dict(zip("ab", denoise_step(model, [a, b]), strict=True))
            forwards: list[dict] = []
            for event in events:
                if event[0] == "block" and event[1] == 0:
                    forwards.append({"blocks": [], "deep": None})
                if event[0] == "block":
                    forwards[-1]["blocks"].append(event[1])
                else:
                    forwards[-1]["deep"] = event[1]
            for fwd in forwards:
                owners = {1: ["a"], 2: ["b"], 3: ["a", "b"]}[fwd["deep"].shape[0]]
                mode = modes[owners[0]]
                assert all(modes[o] is mode for o in owners)
                assert fwd["blocks"] == (full if mode is Mode.FULL else cached)
                sizes = [{"a": 1, "b": 2}[o] for o in owners]
                rows = dict(zip(owners, fwd["deep"].split(sizes), strict=True))
                for owner, deep in rows.items():
                    if mode is Mode.FULL:
                        last_full[owner] = deep
                    else:
                        assert torch.equal(deep, last_full[owner])
                        checked[owner] += 1
    finally:
        for h in handles:
            h.remove()
    assert checked["a"] >= 2 and checked["b"] >= 2


@pytest.mark.parametrize("kind", KINDS)
def test_fora_cached_step_computes_no_attention_or_mlp(pipeline: Pipeline) -> None:
    """On video, no spatial and no temporal branch either: every block's are reused."""
    model = pipeline.model
    calls: list[str] = []
    handles = [
        m.register_forward_hook(lambda *a, name=name: calls.append(name))
        for block in model.blocks
        for name, m in (("attn", block.attn), ("mlp", block.mlp))
    ]
    job = start(pipeline, GenerateParams(steps=6, cache_policy="fora", cache_interval=3))
    try:
        counts = []
        while not job.done:
            calls.clear()
            mode = denoise_step(model, [job])[0]
            counts.append((mode, len(calls)))
    finally:
        for h in handles:
            h.remove()
    d = model.config.depth
    assert counts == [(Mode.FULL, 2 * d), (Mode.CACHED, 0), (Mode.CACHED, 0)] * 2
    one_hidden = 2 * model.config.num_tokens * model.config.hidden_size * 4  # 2 rows, fp32
    assert job.cache.policy.state_bytes(job.cache.state) == 2 * d * one_hidden  # attn + mlp each
