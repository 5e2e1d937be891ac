"""BucketedForward: padded buckets leave real rows as the unpadded eager forward computes them.

This CPU runs modes ``off`` (eager, padded) and ``compile`` (inductor, when it works here); the
``cuda_graphs`` replays are checked against eager by the CUDA-only test at the end.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from model import cache
from model.cache import Mode
from model.networks.skip_dit import SkipDiT
from model.sampling import graphs
from model.sampling.graphs import BucketedForward, ModeUnavailable
from tests.helpers import BATCH_TOL, KERNEL_DEVICE, tiny

BUCKETS = (1, 2, 4, 8)
ROWS = (1, 3, 4, 5, 11)  # 11: above the largest bucket, runs as 8 + 3 (padded to 4)
EXACT = {"rtol": 0.0, "atol": 0.0}
# fp32 GEMMs of another batch size round differently (~2e-7 seen at batch 4 vs 3); inductor
# also fuses and reorders sums (~4e-7 seen).
CLOSE = {"rtol": 1e-5, "atol": 1e-6}

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Tol = dict[str, float]


def _inputs(model: SkipDiT, rows: int, seed: int = 0) -> Batch:
    """x (B, C, H, W), t (B,), y (B,) and a deep feature (B, T, D) to run cached steps on."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, c.in_channels, c.input_size, c.input_size, generator=g)
    t = torch.randint(0, 1000, (rows,), generator=g)
    y = torch.randint(0, c.num_classes + 1, (rows,), generator=g)  # null class included
    deep = torch.randn(rows, c.num_tokens, c.hidden_size, generator=g)
    device = next(model.parameters()).device
    return x.to(device), t.to(device), y.to(device), deep.to(device)


def _compile_missing_reason() -> str | None:
    """Why inductor cannot compile on this machine (no C++ compiler, ...), or None."""
    try:
        torch.compile(lambda a: a * 2 + 1)(torch.ones(3))
    except Exception as error:  # whatever inductor raises, its reason goes into the skip
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(scope="module")
def off_runner(tiny_model: SkipDiT) -> BucketedForward:
    runner = BucketedForward(tiny_model, "off", BUCKETS, depths=(1, 2))
    assert runner.warmup() > 0
    return runner


def _need_inductor() -> None:
    reason = _compile_missing_reason()
    if reason is not None:
        message = f"torch.compile (inductor) cannot run on this CPU: {reason}"
        if os.environ.get("SKIPDIT_REQUIRE_INDUCTOR") == "1":  # CI: the toolchain is there
            pytest.fail(message)
        pytest.skip(message)


def _graphs_compiled_by(warmup: Callable[[], float]) -> int:
    """How many graphs Dynamo compiled while ``warmup`` ran."""
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    assert warmup() > 0
    return counters["stats"]["unique_graphs"] - before


COMPILED: dict[str, int] = {}  # graphs the module's compile runner compiled


@pytest.fixture(scope="module")
def compile_runner(tiny_model: SkipDiT) -> BucketedForward:
    _need_inductor()
    # One depth keeps the CPU compiles at 2 kinds x 2 graphs (seconds each).
    runner = BucketedForward(tiny_model, "compile", BUCKETS, depths=(1,))
    COMPILED["graphs"] = _graphs_compiled_by(runner.warmup)
    return runner


@pytest.fixture(params=["off", pytest.param("compile", marks=pytest.mark.slow)])
def runner(request: pytest.FixtureRequest) -> BucketedForward:
    return request.getfixturevalue(f"{request.param}_runner")


def tolerance(runner: BucketedForward, rows: int) -> Tol:
    """Eager at exactly a bucket's rows runs the unpadded forward's kernels: bitwise."""
    return EXACT if runner.mode == "off" and rows in runner.buckets else CLOSE


def check_full(runner: BucketedForward, rows: int, tol: Tol) -> None:
    model = runner.model
    x, t, y, _ = _inputs(model, rows)
    keys = runner.capture_keys
    with torch.inference_mode():
        want, want_deep = model.capturing(x, t, y, keys)
    out, deep = runner.full(x, t, y, keys)
    assert out.shape == want.shape and set(deep) == set(keys)
    torch.testing.assert_close(out, want, **tol)
    for k in keys:  # the deep feature Skip-Cache stores: entering block D-K
        torch.testing.assert_close(deep[k], want_deep[k], **tol)


def check_cached(runner: BucketedForward, rows: int, tol: Tol) -> None:
    model = runner.model
    x, t, y, deep = _inputs(model, rows)
    for depth in runner.depths:
        with torch.inference_mode():
            want = model.forward_cached(x, t, y, deep, depth)
        torch.testing.assert_close(runner.cached(x, t, y, deep, depth), want, **tol)


@pytest.mark.parametrize("rows", ROWS)
def test_full_real_rows_equal_the_unpadded_forward(runner, rows: int) -> None:
    check_full(runner, rows, tolerance(runner, rows))


@pytest.mark.parametrize("rows", ROWS)
def test_cached_real_rows_equal_the_unpadded_forward(runner, rows: int) -> None:
    check_cached(runner, rows, tolerance(runner, rows))


def noisy_stage(
    seed: int, padded: list[int]
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``stage`` whose padding rows are large noise (valid timesteps and labels); appends
    the padding rows of every call to ``padded``."""
    g = torch.Generator().manual_seed(seed)

    def stage(dest: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        shape = dest.shape
        if dest.is_floating_point():
            noise = 100 * torch.randn(shape, generator=g)
        else:  # timesteps and labels: any value both embedders take
            noise = torch.randint(0, 10, shape, generator=g)
        dest.copy_(noise.to(dest.device, dest.dtype))
        dest[: real.shape[0]].copy_(real)
        padded.append(dest.shape[0] - real.shape[0])
        return dest

    return stage


def check_padding_unseen(runner: BucketedForward, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two different paddings (row-0 copies, then noise) give bitwise the same real rows."""
    x, t, y, deep = _inputs(runner.model, 3)  # bucket 4: one padding row
    depth = runner.depths[0]
    out, captured = runner.full(x, t, y, runner.capture_keys)
    cached = runner.cached(x, t, y, deep, depth)
    padded: list[int] = []
    monkeypatch.setattr(graphs, "stage", noisy_stage(seed=1, padded=padded))
    noisy_out, noisy_captured = runner.full(x, t, y, runner.capture_keys)
    torch.testing.assert_close(noisy_out, out, **EXACT)
    for k in runner.capture_keys:
        torch.testing.assert_close(noisy_captured[k], captured[k], **EXACT)
    torch.testing.assert_close(runner.cached(x, t, y, deep, depth), cached, **EXACT)
    assert padded == [1] * 7  # x, t, y of the full forward; x, t, y, deep of the cached one


def test_fractional_timesteps_reach_the_network_unrounded(off_runner: BucketedForward) -> None:
    """Flow matching feeds sigma x 1000 (fractional): the prepared forwards take t as it is."""
    model = off_runner.model
    x, _, y, deep = _inputs(model, 2)
    t = torch.tensor([512.7, 3.25])
    with torch.inference_mode():
        want = model(x, t, y)
        rounded = model(x, t.long(), y)
        want_cached = model.forward_cached(x, t, y, deep, 1)
    assert not torch.equal(want, rounded)  # the fraction matters
    torch.testing.assert_close(off_runner.full(x, t, y)[0], want, **EXACT)
    torch.testing.assert_close(off_runner.cached(x, t, y, deep, 1), want_cached, **EXACT)


def test_padding_content_never_reaches_real_rows(runner, monkeypatch) -> None:
    check_padding_unseen(runner, monkeypatch)


def check_outputs_owned(runner: BucketedForward) -> None:
    """A later call (another replay of the same graph) leaves earlier outputs as they were."""
    a, b = _inputs(runner.model, 3, seed=1), _inputs(runner.model, 3, seed=2)
    out_a, deep_a = runner.full(*a[:3], runner.capture_keys)
    cached_a = runner.cached(*a, runner.depths[0])
    kept = [out_a.clone(), cached_a.clone(), *(h.clone() for h in deep_a.values())]
    runner.full(*b[:3], runner.capture_keys)
    runner.cached(*b, runner.depths[0])
    for now, then in zip([out_a, cached_a, *deep_a.values()], kept, strict=True):
        torch.testing.assert_close(now, then, **EXACT)


def test_outputs_are_the_callers_own(off_runner: BucketedForward) -> None:
    check_outputs_owned(off_runner)


@pytest.mark.slow
def test_compile_makes_one_graph_per_kind_for_every_bucket_of_two_rows_or_more(
    compile_runner: BucketedForward,
) -> None:
    """The batch dimension is dynamic: 4 buckets x (full, cached at K=1) make 2 x 2 graphs
    (bucket 1, which Dynamo specialises, and one for buckets 2..8), not 2 x 4; and every other
    bucket's first request runs without compiling (``fail_on_recompile`` would raise)."""
    assert COMPILED["graphs"] == 2 * 2
    for rows in (2, 3, 5, 8):
        check_full(compile_runner, rows, CLOSE)


@pytest.mark.slow
def test_compile_traces_the_triton_kernels_as_ops() -> None:
    """``SKIPDIT_GRAPHS=compile`` with the Triton kernels: each kernel is one op in a full graph
    (``fullgraph=True`` raises at a graph break), and the compiled forwards equal the network's
    own on the kernels. On the GPU where there is one, else in Triton's interpreter here."""
    _need_inductor()
    model = tiny(seed=3).to(KERNEL_DEVICE)
    assert model.use_kernels("triton") == "triton"
    runner = BucketedForward(model, "compile", (1, 4), depths=(1,))
    assert _graphs_compiled_by(runner.warmup) == 2 * 2
    for rows in (1, 3):
        check_full(runner, rows, BATCH_TOL)
        check_cached(runner, rows, BATCH_TOL)


def test_capture_keys_are_the_skip_cache_deep_features(off_runner: BucketedForward) -> None:
    d = off_runner.model.config.depth
    assert off_runner.capture_keys == (d - 1, d - 2)  # depths (1, 2)
    out, captured = off_runner.full(*_inputs(off_runner.model, 2)[:3])  # no keys asked
    assert captured == {} and out.shape[0] == 2


def test_routing_serves_none_and_prepared_skip_cache_depths(off_runner) -> None:
    config = off_runner.model.config
    none = cache.build("none", config)
    prepared, unprepared = (cache.build("skip_cache", config, depth=k) for k in (1, 2))
    fora = cache.build("fora", config)
    only_depth_1 = BucketedForward(off_runner.model, "off", BUCKETS, depths=(1,))
    assert only_depth_1.serves(none, Mode.FULL) and not only_depth_1.serves(none, Mode.CACHED)
    assert only_depth_1.serves(prepared, Mode.FULL) and only_depth_1.serves(prepared, Mode.CACHED)
    assert not only_depth_1.serves(unprepared, Mode.CACHED)
    assert not only_depth_1.serves(unprepared, Mode.FULL)  # its deep feature is not captured
    assert not any(only_depth_1.serves(fora, mode) for mode in Mode)
    adaptive = cache.build("skip_cache", config, depth=1, threshold=0.1)  # decides inside
    assert not any(only_depth_1.serves(adaptive, mode) for mode in Mode)
    no_depths = BucketedForward(off_runner.model, "off")
    assert no_depths.serves(none, Mode.FULL) and not no_depths.serves(prepared, Mode.FULL)


def test_unprepared_work_and_steps_before_warmup_raise(off_runner) -> None:
    model = off_runner.model
    x, t, y, deep = _inputs(model, 2)
    with pytest.raises(ValueError, match="not prepared"):
        off_runner.full(x, t, y, {("attn", 0)})  # FORA's capture stays eager
    with pytest.raises(ValueError, match="cache depth 3 is not prepared"):
        off_runner.cached(x, t, y, deep, 3)
    with pytest.raises(ValueError, match="shapes"):
        off_runner.full(x, t[:1], y)  # a static buffer would broadcast this silently
    with pytest.raises(RuntimeError, match="warmup"):
        BucketedForward(model, "off", BUCKETS, depths=(1,)).cached(x, t, y, deep, 1)
    with pytest.raises(ValueError, match="mode must be one of"):
        BucketedForward(model, "graphs")
    with pytest.raises(ValueError, match="move or cast the model"):
        BucketedForward(model, "off", dtype=torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_graphs_without_cuda_is_an_error_naming_the_mode(tiny_model) -> None:
    with pytest.raises(ModeUnavailable, match="'cuda_graphs' needs a CUDA device"):
        BucketedForward(tiny_model, "cuda_graphs", BUCKETS, depths=(1,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_equal_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny().cuda()
    runner = BucketedForward(model, "cuda_graphs", BUCKETS, depths=(1, 2))
    assert runner.warmup() > 0
    for rows in ROWS:  # GPU kernels may differ between batch sizes: unpadded eager is close
        check_full(runner, rows, BATCH_TOL)
        check_cached(runner, rows, BATCH_TOL)
    padded_eager = BucketedForward(model, "off", BUCKETS, depths=(1, 2))
    padded_eager.warmup()
    same_kernels = {"rtol": 1e-6, "atol": 1e-6}
    for rows in ROWS:  # the same padded batches eagerly: the kernels the graphs captured
        x, t, y, deep = _inputs(model, rows)
        replayed, eager = runner.full(x, t, y, (3,)), padded_eager.full(x, t, y, (3,))
        torch.testing.assert_close(replayed, eager, **same_kernels)  # (out, {3: deep feature})
        replayed, eager = runner.cached(x, t, y, deep, 2), padded_eager.cached(x, t, y, deep, 2)
        torch.testing.assert_close(replayed, eager, **same_kernels)
    check_outputs_owned(runner)
    check_padding_unseen(runner, monkeypatch)
