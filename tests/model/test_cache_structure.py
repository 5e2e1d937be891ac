"""Structure of every cache policy's cached step, on every model kind, exactly.

On a cached step taken at the very inputs of the request's last full step, a correct cache
reproduces that full step: each block it runs outputs what the full step's block did (so each
block was fed its own stored tensors, in the right place) and the output is the full step's.
Which blocks run is the policy's rule. And a later full step replaces the store: a cached step
at the newer inputs reproduces the newer full step. A broken policy (branches swapped, a block
reading its neighbour's store, a store never refreshed, a wrong deep feature) fails one of these
by name; ``tests/mutants.py`` checks that it does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from model.cache import POLICIES, Mode
from model.networks.dydit import DyDiT
from model.networks.presets import build, preset
from model.networks.skip_dit import SkipDiT
from tests.helpers import BATCH_TOL, randomized
from tests.model.helpers import routing

# policy -> config overrides that make its cached step cache.
CONFIGS: dict[str, dict[str, Any]] = {
    "skip_cache": {"interval": 3},
    "fora": {},
    "delta_dit": {"blocks": 1, "boundary": 500.0},
    "toca": {"ratio": 0.5},
    "fbcache": {"threshold": 0.5},
    "teacache": {"threshold": 0.5},
}
STATIC = {"skip_cache", "fora", "delta_dit", "toca"}  # no decision inside the forward


def _image(long_skip: bool) -> SkipDiT:
    torch.manual_seed(0)
    return randomized(build(preset("digits-tiny", long_skip=long_skip)), 0)


def _video() -> SkipDiT:
    torch.manual_seed(0)
    return randomized(build(preset("digits-video-tiny")), 0)


def _dydit() -> SkipDiT:
    return routing(DyDiT.from_base(_image(True)))


MODELS: dict[str, Callable[[], SkipDiT]] = {
    "skip-dit": lambda: _image(True),
    "dit": lambda: _image(False),
    "skip-latte": _video,
    "dydit": _dydit,
}
CONFIG_OF = {
    "skip-dit": preset("digits-tiny"),
    "dit": preset("digits-tiny", long_skip=False),
    "skip-latte": preset("digits-video-tiny"),
    "dydit": preset("digits-tiny", dynamic=True),
}
CASES = [(p, kind) for p in CONFIGS for kind in MODELS if POLICIES[p].applies_to(CONFIG_OF[kind])]


@pytest.fixture(scope="module")
def models() -> dict[str, SkipDiT]:
    return {kind: make().eval() for kind, make in MODELS.items()}


def units_run(policy: str, model: SkipDiT, config: Any, t: int) -> list[int]:
    """The units (blocks; video: pairs) a cached step of ``policy`` runs, by its rule."""
    d = model.config.units
    if policy == "skip_cache":
        k = config.depth
        return [*range(k), *range(d - k, d)] if model.config.long_skip else [*range(d - k, d)]
    if policy == "delta_dit":
        n = config.blocks
        return list(range(d - n)) if t >= config.boundary else list(range(n, d))
    return {"fora": list(range(d)), "toca": list(range(d)), "fbcache": [0], "teacache": []}[policy]


def _unit_of(model: SkipDiT, block: int) -> int:
    return block // (len(model.blocks) // model.config.units)  # video: 2 blocks a pair


@contextmanager
def block_outputs(model: SkipDiT) -> Iterator[list[tuple[int, torch.Tensor]]]:
    """(block index, output) of every block that runs, in order."""
    seen: list[tuple[int, torch.Tensor]] = []
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: seen.append((i, o.detach().clone())))
        for i, block in enumerate(model.blocks)
    ]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _inputs(model: SkipDiT, t: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *model.config.sample_shape, generator=g)
    return x, torch.full((2,), t), torch.tensor([3, 7])


def _full(policy: str, model: SkipDiT, config: Any, state: Any, inputs) -> torch.Tensor:
    """A full step as the pipeline runs it: one forward capturing what the policy asks for."""
    p = POLICIES[policy]
    out, captured = model.capturing(*inputs, p.capture_blocks(config, model.config))
    p.on_full(config, state, captured)
    return out


@pytest.mark.parametrize("t", [900, 100])
@pytest.mark.parametrize(("policy", "kind"), CASES)
@torch.no_grad()
def test_a_cached_step_at_the_full_steps_inputs_reproduces_it_block_by_block(
    models: dict[str, SkipDiT], policy: str, kind: str, t: int
) -> None:
    model, p = models[kind], POLICIES[policy]
    config = p.default_config(model.config, **CONFIGS[policy])
    state = p.new_state()
    inputs = _inputs(model, t, seed=1)
    with block_outputs(model) as full_blocks:
        full = _full(policy, model, config, state, inputs)
    with block_outputs(model) as cached_blocks:
        cached = p.run_cached(model, *inputs, config, [state])
    assert p.realized_mode(state, Mode.CACHED) is Mode.CACHED
    ran = list(dict.fromkeys(_unit_of(model, i) for i, _ in cached_blocks))
    assert ran == units_run(policy, model, config, t)
    reference = dict(full_blocks)
    for i, out in cached_blocks:  # each block outputs what it did on the full step
        torch.testing.assert_close(out, reference[i], **BATCH_TOL, msg=f"block {i}")
    torch.testing.assert_close(cached, full, **BATCH_TOL)


@pytest.mark.parametrize(("policy", "kind"), CASES)
@torch.no_grad()
def test_a_full_step_replaces_what_the_last_one_stored(
    models: dict[str, SkipDiT], policy: str, kind: str
) -> None:
    model, p = models[kind], POLICIES[policy]
    config = p.default_config(model.config, **CONFIGS[policy])
    older, newer = _inputs(model, 400, seed=1), _inputs(model, 400, seed=2)
    state = p.new_state()
    _full(policy, model, config, state, older)
    full = _full(policy, model, config, state, newer)
    torch.testing.assert_close(p.run_cached(model, *newer, config, [state]), full, **BATCH_TOL)
    if policy in STATIC:  # and the store is what makes it so: an older store gives another step
        stale = p.new_state()
        _full(policy, model, config, stale, older)
        assert not torch.allclose(p.run_cached(model, *newer, config, [stale]), full, **BATCH_TOL)


# The policies that decide inside a cached step, at a threshold any real change crosses.
DECIDING: dict[str, dict[str, Any]] = {
    "fbcache": {"threshold": 1e-6},
    "teacache": {"threshold": 1e-6},
    "skip_cache": {"interval": 3, "threshold": 1e-6},  # adaptive
}
DECIDING_CASES = [(p, kind) for p, kind in CASES if p in DECIDING]


@pytest.mark.parametrize(("policy", "kind"), DECIDING_CASES)
@torch.no_grad()
def test_a_recompute_inside_a_cached_step_replaces_the_store(
    models: dict[str, SkipDiT], policy: str, kind: str
) -> None:
    """Stored at older inputs, a cached step at newer ones sees the change and computes; what it
    computed is stored: a second cached step at the same inputs reuses it and reproduces it."""
    model, p = models[kind], POLICIES[policy]
    config = p.default_config(model.config, **DECIDING[policy])
    older, newer = _inputs(model, 400, seed=1), _inputs(model, 400, seed=2)
    state = p.new_state()
    _full(policy, model, config, state, older)
    full = model(*newer)
    modes = []
    for _ in range(2):
        out = p.run_cached(model, *newer, config, [state])
        modes.append(p.realized_mode(state, Mode.CACHED))
        torch.testing.assert_close(out, full, **BATCH_TOL)
    assert modes == [Mode.FULL, Mode.CACHED]


@torch.no_grad()
def test_fora_and_toca_cached_steps_compute_only_what_they_refresh(
    models: dict[str, SkipDiT],
) -> None:
    """FORA's cached blocks run no attention or MLP; ToCa's run them on its ratio of tokens."""
    model = models["skip-dit"]
    tokens, calls = model.config.num_tokens, []
    handles = [
        m.register_forward_hook(lambda m, a, o, name=name: calls.append((name, a[0].shape[1])))
        for block in model.blocks
        for name, m in (("attn", block.attn), ("mlp", block.mlp))
    ]
    try:
        for policy in ("fora", "toca"):
            p = POLICIES[policy]
            config = p.default_config(model.config, **CONFIGS[policy])
            state, inputs = p.new_state(), _inputs(model, 500, seed=1)
            _full(policy, model, config, state, inputs)
            calls.clear()
            p.run_cached(model, *inputs, config, [state])
            # ToCa's attention is computed by hand (partial queries): its MLP shows the tokens.
            expected = [] if policy == "fora" else [("mlp", tokens // 2)] * model.config.depth
            assert calls == expected, policy
    finally:
        for h in handles:
            h.remove()
