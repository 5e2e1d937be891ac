"""TeaCache: its accumulate-and-skip rule, per-request decisions in one forward, video, the
calibration command and the card's coefficients reaching every request."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch

from model import registry
from model.cache import POLICIES, Mode
from model.cache.teacache import IDENTITY, TeaCacheConfig
from model.errors import FieldError
from model.networks.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_pretrained
from model.networks.presets import build, preset
from model.sampling.pipeline import Pipeline
from service.cli import main
from service.request import GenerateParams
from tests.helpers import BATCH_TOL, generate, randomized, start, tiny, tiny_text_model
from tests.model.helpers import run_with_modes


def teacache(threshold: float, seed: int = 1, label: int = 3, steps: int = 10) -> GenerateParams:
    return GenerateParams(
        steps=steps, seed=seed, class_label=label, cache_policy="teacache",
        cache_threshold=threshold,
    )  # fmt: skip


# ----------------------------------------------------------------------------- the rule


def test_the_polynomial_is_highest_power_first_and_checked() -> None:
    assert TeaCacheConfig(coefficients=(1, 0, 0)).rescale(3.0) == 9.0
    assert TeaCacheConfig().rescale(0.25) == 0.25  # the identity default
    assert TeaCacheConfig(coefficients=[0.5, 1]).coefficients == (0.5, 1.0)  # JSON lists too
    with pytest.raises(FieldError):
        TeaCacheConfig(coefficients=(float("nan"),)).check()
    with pytest.raises(FieldError) as err:
        TeaCacheConfig(threshold=1.5).check()
    assert err.value.field == "threshold"


def test_large_thresholds_skip_steps_and_zero_skips_none(tiny_pipeline: Pipeline) -> None:
    thresholds = (1.0, 0.5, 0.2, 0.0)
    _, modes = run_with_modes(tiny_pipeline, [teacache(th) for th in thresholds])
    skipped = [m.count(Mode.CACHED) for m in modes]
    assert skipped == [7, 6, 4, 0]  # of 10: the first and the last (t <= 20) always compute
    assert all(m[0] is Mode.FULL and m[-1] is Mode.FULL for m in modes)  # first, t <= t_end


def test_the_rescaled_change_accumulates_until_the_threshold(tiny_pipeline: Pipeline) -> None:
    """Constant rescaled change 0.3 against threshold 0.5: skip (0.3), compute (0.6, back to
    0), skip, compute. A skipped step on the same input reproduces the full output."""
    model = tiny_pipeline.model
    policy = POLICIES["teacache"]
    config = policy.default_config(model.config, threshold=0.5, coefficients=(0.3,))
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([500, 500]), torch.tensor([1, 1])
    with torch.no_grad():
        full, captured = model.capturing(x, t, y, policy.capture_blocks(config, model.config))
    state = policy.new_state()
    policy.on_full(config, state, captured)
    ran = []
    for _ in range(4):
        with torch.no_grad():
            out = policy.run_cached(model, x, t, y, config, [state])
        ran.append(policy.realized_mode(state, Mode.CACHED))
        torch.testing.assert_close(out, full, **BATCH_TOL)
    assert ran == [Mode.CACHED, Mode.FULL, Mode.CACHED, Mode.FULL]


def test_decisions_are_per_request_and_computing_rows_run_as_one_batch(
    tiny_pipeline: Pipeline,
) -> None:
    """Three requests in one cached forward, each with its own threshold: the block stack runs
    once, on exactly the rows of the two that must compute."""
    model = tiny_pipeline.model
    policy = POLICIES["teacache"]
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    t, y = torch.full((5,), 400), torch.tensor([1, 1, 2, 3, 3])
    with torch.no_grad():
        full, captured = model.capturing(x, t, y, policy.capture_blocks(policy.default_config(
            model.config), model.config))  # fmt: skip
    states, configs = [], []
    for rows, threshold in ((slice(0, 2), 0.2), (slice(2, 3), 0.9), (slice(3, 5), 0.2)):
        config = policy.default_config(model.config, threshold=threshold, coefficients=(0.5,))
        state = policy.new_state()
        policy.on_full(config, state, {k: v[rows] for k, v in captured.items()})
        states.append(state)
        configs.append(config)
    rows_run: list[int] = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, o: rows_run.append(o.shape[0]))
    try:
        with torch.no_grad():
            out = policy.run_cached(model, x, t, y, configs[1], states)  # a batch-mate's config
    finally:
        handle.remove()
    modes = [policy.realized_mode(s, Mode.CACHED) for s in states]
    assert modes == [Mode.FULL, Mode.CACHED, Mode.FULL] and rows_run == [4]
    torch.testing.assert_close(out, full, **BATCH_TOL)


def test_mixed_thresholds_in_one_batch_equal_each_request_alone(tiny_pipeline: Pipeline) -> None:
    requests = [teacache(0.6, seed=1, label=1), teacache(0.15, seed=2, label=7),
                teacache(1.0, seed=3, label=4)]  # fmt: skip
    together, modes = run_with_modes(tiny_pipeline, requests)
    assert len({tuple(m) for m in modes}) > 1  # the thresholds really decide differently
    for params, batched, batched_modes in zip(requests, together, modes, strict=True):
        (alone,), (alone_modes,) = run_with_modes(tiny_pipeline, [params])
        assert batched_modes == alone_modes
        torch.testing.assert_close(batched, alone, **BATCH_TOL)


def test_video_models_skip_per_request_too() -> None:
    torch.manual_seed(2)
    pipeline = Pipeline(randomized(build(preset("digits-video-tiny")), seed=2), default_guidance=2)
    requests = [teacache(1.0, seed=1, label=2, steps=6), teacache(0.2, seed=2, label=5, steps=6)]
    together, modes = run_with_modes(pipeline, requests)
    assert Mode.CACHED in modes[0]
    for params, batched in zip(requests, together, strict=True):
        (alone,), _ = run_with_modes(pipeline, [params])
        torch.testing.assert_close(batched, alone, **BATCH_TOL)


# ----------------------------------------------------------------------------- calibration


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return save_pretrained(tiny(seed=3), tmp_path / "tiny", card={"name": "t", "x": [1, 2]})


def calibrate(directory: Path, *extra: str) -> None:
    args = ["calibrate-teacache", "--models", str(directory), "--per-class", "1", "--steps", "6"]
    assert main([*args, *extra]) == 0


def test_calibration_is_reproducible_and_changes_only_the_card(model_dir: Path) -> None:
    before = json.loads((model_dir / CONFIG_FILE).read_text())
    weights = (model_dir / WEIGHTS_FILE).read_bytes()
    calibrate(model_dir, "--dry-run")
    assert json.loads((model_dir / CONFIG_FILE).read_text()) == before
    calibrate(model_dir)
    first = (model_dir / CONFIG_FILE).read_text()
    calibrate(model_dir)
    assert (model_dir / CONFIG_FILE).read_text() == first  # same coefficients, same bytes
    after = json.loads(first)
    entry = after["card"].pop("teacache")
    assert after == before and (model_dir / WEIGHTS_FILE).read_bytes() == weights
    assert len(entry["coefficients"]) == 5 and entry["runs"]["points"] == 10 * 5
    assert entry["runs"]["guidance"] == 1.5 and entry["command"].startswith("skipdit")


def test_the_trace_is_each_requests_input_and_output_change_step_to_step(
    model_dir: Path,
) -> None:
    """The calibration's points, recomputed here from a plain uncached run: per request and
    step after its first, the relative L1 change of block 0's modulated input (x) and of the
    network's output (y), over the request's own rows (conditional and unconditional)."""
    from model.training.calibrate import calibration_requests, trace
    from model.training.options import CalibrateOptions

    pipeline = registry.load(str(model_dir)).pipeline
    requests = calibration_requests(pipeline, CalibrateOptions(per_class=2, steps=5), 3)
    points = trace(pipeline, requests)
    model = pipeline.model
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []  # (modulated input, output) per step

    def hook(module, args, out) -> None:
        x, t, y = args
        calls.append((module.modulated_input(*module.embed(x, t, y)), out))

    handle = model.register_forward_hook(hook)
    try:
        generate(pipeline, requests)  # batched: one forward a step, rows in request order
    finally:
        handle.remove()

    def change(now: torch.Tensor, before: torch.Tensor) -> float:
        return float((now - before).abs().sum() / before.abs().sum())  # the same mean ratio

    rows = 2 * 2  # per_class 2, guidance: conditional and unconditional rows
    expected = []
    for r in range(3):
        own = [(m[r * rows : (r + 1) * rows], o[r * rows : (r + 1) * rows]) for m, o in calls]
        expected += [(change(now[0], before[0]), change(now[1], before[1]))
                     for before, now in itertools.pairwise(own)]  # fmt: skip
    assert len(points) == 3 * 4
    # trace() lists the points step by step (every request of step s, then step s+1).
    by_step = [expected[r * 4 + s] for s in range(4) for r in range(3)]
    np.testing.assert_allclose(np.array(points), np.array(by_step), rtol=1e-5)
    assert all(x > 0 and y > 0 for x, y in points)


def test_a_text_video_model_calibrates_on_captions_of_digits_in_motion(tmp_path: Path) -> None:
    """A text-to-video model is traced on what it was trained on: motion captions (a scene's
    caption, "a 3 on the left", is no clip's), then fitted and stored like any other."""
    from model.training import motion
    from model.training.calibrate import calibrate_model, calibration_requests
    from model.training.options import CalibrateOptions

    model_dir = tiny_text_model(tmp_path / "t2v", preset="digits-t2v-tiny")
    loaded = registry.load(str(model_dir))
    opts = CalibrateOptions(per_class=1, steps=3)
    requests = calibration_requests(loaded.pipeline, opts, 4, loaded.info.kind)
    stated = [motion.parse(cast(str, r.prompt)) for r in requests]  # ValueError: not a motion
    assert len({(c.digit, c.motion) for c in stated}) > 1  # seeded draws, not one caption
    assert not any(c.held_out_combo for c in stated)  # training captions only
    entry = calibrate_model(str(model_dir), opts)
    assert entry["runs"]["prompts"] == 10 and entry["runs"]["points"] == 10 * 2
    assert len(entry["coefficients"]) == 5


def test_the_fit_is_the_least_squares_polynomial_highest_power_first() -> None:
    from model.training.calibrate import fit

    x = np.linspace(0.01, 0.4, 30)
    y = 3 * x**3 - 0.5 * x + 0.02  # exactly degree 3: the fit recovers it
    np.testing.assert_allclose(fit(list(zip(x, y, strict=True))), [0, 3, 0, -0.5, 0.02],
                               atol=1e-8)  # fmt: skip
    assert TeaCacheConfig(coefficients=tuple(fit(list(zip(x, y, strict=True))))).rescale(
        0.2
    ) == pytest.approx(3 * 0.008 - 0.1 + 0.02)


def test_the_cards_coefficients_reach_every_teacache_request(model_dir: Path) -> None:
    calibrate(model_dir)
    stored = tuple(json.loads((model_dir / CONFIG_FILE).read_text())["card"]["teacache"][
        "coefficients"])  # fmt: skip
    assert stored != IDENTITY
    loaded = registry.load(str(model_dir))
    job = start(loaded.pipeline, GenerateParams(cache_policy="teacache", cache_threshold=0.3))
    assert job.cache.config.coefficients == stored and job.cache.config.threshold == 0.3
    assert loaded.info.cache_defaults()["teacache"]["coefficients"] == stored
    # Other policies and models without a calibration keep the defaults.
    assert start(loaded.pipeline, GenerateParams()).cache.policy.name == "none"  # no default
    assert POLICIES["teacache"].default_config(loaded.config).coefficients == IDENTITY


def test_a_model_without_a_directory_cannot_be_calibrated(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["calibrate-teacache", "--models", "random:digits-tiny"])
    assert exit_.value.code == 2 and "not a model directory" in capsys.readouterr().err


def test_every_shipped_model_carries_a_calibration() -> None:
    from model.training.calibrate import default_models

    assert default_models() == registry.shipped_models()
    assert all("teacache" in registry.describe(name).card for name in default_models())


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", ["digits-skip-dit", "digits-dit", "digits-skip-dydit", "digits-video-skip"]
)
def test_the_command_reproduces_the_shipped_coefficients(name: str) -> None:
    from model.training.calibrate import calibrate as run
    from model.training.options import CalibrateOptions

    shipped = registry.describe(name).card["teacache"]
    runs = shipped["runs"]
    opts = CalibrateOptions(models=[name], per_class=runs["per_class"], steps=runs["steps"],
                            seed=runs["seed"], dry_run=True)  # fmt: skip
    (entry,) = run(opts).values()
    got = dict(entry["runs"])
    np.testing.assert_allclose(got.pop("input_range"), runs["input_range"], rtol=1e-5)
    assert got == {k: v for k, v in runs.items() if k != "input_range"}
    # Float rounding (thread count, CPU) moves the measured changes in their last bits and the
    # ill-conditioned coefficients a little; the polynomial over the calibrated range stays put.
    xs = np.linspace(*runs["input_range"], 50)
    np.testing.assert_allclose(
        np.polyval(entry["coefficients"], xs), np.polyval(shipped["coefficients"], xs),
        rtol=1e-4, atol=1e-6,
    )  # fmt: skip
