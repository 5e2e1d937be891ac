"""LoRA adapters (``model.networks.lora``) in the sampling pipeline: rows of two adapters and
rows of none share one step batch and each equals its request run alone (also under a cache
policy and through the captured-step router); the on-disk format loads strictly; plans refuse
an unknown adapter naming ``adapter``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from model import registry
from model.cache.skip_cache import default_depth
from model.errors import FieldError
from model.networks import lora
from model.networks.skip_dit import SkipDiT
from model.sampling.graphs import BucketedForward
from model.sampling.pipeline import Pipeline, forward_group
from model.sampling.plan import RunPlan
from tests.helpers import BATCH_TOL, tiny


def random_adapter(model: SkipDiT, name: str, seed: int, rank: int = 2) -> lora.LoRA:
    """A fresh adapter with B made non-zero (fresh ones start as the base exactly)."""
    adapter = lora.fresh(model, name, "tiny", rank, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for _, b in adapter.weights.values():
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return adapter


def saved(adapter: lora.LoRA, directory: Path) -> Path:
    return lora.save(adapter, directory / adapter.name)


@pytest.fixture(scope="module")
def model() -> SkipDiT:
    return tiny(seed=4)


@pytest.fixture(scope="module")
def pipeline(model: SkipDiT, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The tiny network with two adapters, written in the on-disk layout and loaded back; one
    targets only the attention of block 0 and the long skips' linears."""
    root = tmp_path_factory.mktemp("adapters")
    a = random_adapter(model, "a", seed=1)
    b = lora.fresh(model, "b", "tiny", 3, alpha=6.0, targets=["blocks.0.attn.qkv",
                   "skip_linears.0.linear", "skip_linears.1.linear"])  # fmt: skip
    with torch.no_grad():
        for _, up in b.weights.values():
            up.normal_(0, 0.3)
    adapters = {x.name: lora.load(saved(x, root), model) for x in (a, b)}
    # flow matching: no clipped x0 (DDIM on pixels clips), so an adapter shows in the latents
    return Pipeline(model, default_guidance=2.0, objective="flow", adapters=adapters)


def plans(pipeline: Pipeline, policy: str) -> list[RunPlan]:
    cache = {"policy": policy} | ({"params": {"interval": 2}} if policy != "none" else {})
    asks = [
        {"class_label": 1, "seed": 1, "adapter": "a"},
        {"class_label": 2, "seed": 2, "adapter": "b", "adapter_scale": 0.5},
        {"class_label": 3, "seed": 3},
        {"class_label": 4, "seed": 4, "adapter": "a", "adapter_scale": 2.0, "num_images": 2},
        {"class_label": 5, "seed": 5, "guidance": 1.0, "adapter": "b"},
    ]
    return [pipeline.plan(steps=6, **ask, **cache) for ask in asks]


@pytest.mark.parametrize("policy", ["none", "skip_cache", "fora"])
def test_rows_of_two_adapters_and_none_in_one_batch_equal_each_alone(
    pipeline: Pipeline, policy: str
) -> None:
    runs = plans(pipeline, policy)
    together = pipeline.generate(runs)
    for run, batched in zip(runs, together, strict=True):
        (alone,) = pipeline.generate([run])
        torch.testing.assert_close(batched.latents, alone.latents, **BATCH_TOL)
    # and the adapters act: each adapted request differs from its base run
    for run, batched in zip(runs, together, strict=True):
        if run.adapter is not None:
            (base,) = pipeline.generate([RunPlan.from_json(run.to_json() | {"adapter": None})])
            assert (batched.latents - base.latents).abs().max() > 0.05, run.adapter


def test_scale_zero_is_the_base_and_scale_moves_the_output(pipeline: Pipeline) -> None:
    zero, one, two, base = pipeline.generate(
        [pipeline.plan(steps=4, seed=7, adapter="a", adapter_scale=s) for s in (0.0, 1.0, 2.0)]
        + [pipeline.plan(steps=4, seed=7)]
    )
    torch.testing.assert_close(zero.latents, base.latents, **BATCH_TOL)
    assert (two.latents - base.latents).abs().max() > (one.latents - base.latents).abs().max()


def test_the_network_is_untouched_after_an_adapted_forward(
    pipeline: Pipeline, model: SkipDiT
) -> None:
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500, 10]), torch.tensor([1, 2])
    with torch.inference_mode():
        before = model(x, t, y)
        rows = lora.Rows.of([(lora.Choice(pipeline.adapters["a"]), 1), (None, 1)], x.device)
        with lora.applied(model, rows):
            adapted = model(x, t, y)
        after = model(x, t, y)
    assert torch.equal(before, after)
    assert torch.equal(adapted[1], before[1])  # the row of no adapter: the base output exactly
    assert not torch.allclose(adapted[0], before[0])


def test_captured_step_groups_with_an_adapter_run_eagerly(pipeline: Pipeline) -> None:
    """The bucketed runner (``off``: its padded eager batches, the graphs' stand-in on CPU)
    serves groups without adapters; a group with one goes to the eager forward."""
    depth = default_depth(pipeline.model.config)
    runner = BucketedForward(pipeline.model, "off", (1, 2, 4, 8), {depth})
    runner.warmup()
    routed = Pipeline(
        pipeline.model, default_guidance=2.0, objective="flow", adapters=pipeline.adapters
    )
    routed.forward = runner.group_forward(forward_group)
    runs = plans(pipeline, "skip_cache")
    for got, want in zip(routed.generate(runs), pipeline.generate(runs), strict=True):
        torch.testing.assert_close(got.latents, want.latents, **BATCH_TOL)


def test_plans_refuse_an_unknown_adapter_and_a_bad_scale(pipeline: Pipeline) -> None:
    with pytest.raises(FieldError) as unknown:
        pipeline.plan(adapter="nope")
    assert unknown.value.field == "adapter" and "'a'" in unknown.value.message
    with pytest.raises(FieldError) as scale:
        pipeline.plan(adapter="a", adapter_scale=2.5)
    assert scale.value.field == "adapter_scale"
    with pytest.raises(FieldError) as alone:
        pipeline.plan(adapter_scale=1.0)
    assert alone.value.field == "adapter_scale"


def test_a_plan_keeps_its_adapter_through_json(pipeline: Pipeline) -> None:
    run = pipeline.plan(adapter="b", adapter_scale=0.25)
    assert RunPlan.from_json(run.to_json()) == run


def test_loading_refuses_unknown_targets_and_wrong_shapes_naming_them(
    model: SkipDiT, tmp_path: Path
) -> None:
    good = saved(random_adapter(model, "good", seed=2), tmp_path)
    state = lora.load_file(str(good / lora.WEIGHTS_FILE))
    state["blocks.1.mlp.fc2.lora_B"] = torch.zeros(5, 2)
    lora.save_file(state, str(good / lora.WEIGHTS_FILE))
    with pytest.raises(lora.AdapterError, match=r"blocks\.1\.mlp\.fc2\.lora_B: adapter \(5, 2\)"):
        lora.load(good, model)
    del state["blocks.1.mlp.fc2.lora_B"]
    state["blocks.9.attn.qkv.lora_A"] = torch.zeros(2, 32)
    lora.save_file(state, str(good / lora.WEIGHTS_FILE))
    with pytest.raises(lora.AdapterError, match=r"missing keys \['blocks\.1\.mlp\.fc2\.lora_B'\]"):
        lora.load(good, model)
    with pytest.raises(lora.AdapterError, match=r"unknown targets \['blocks\.9\.attn\.qkv'\]"):
        lora.fresh(model, "x", "tiny", 2, targets=["blocks.9.attn.qkv"])


@pytest.mark.parametrize("adapter", ["a", "b"])
def test_an_adapted_row_equals_the_network_with_the_adapter_merged(
    pipeline: Pipeline, model: SkipDiT, adapter: str
) -> None:
    """W + scale (alpha / r) B A in every targeted linear (the long skips' included) gives the
    adapted row's output; the base rows beside it keep the base output."""
    chosen = pipeline.adapters[adapter]
    merged = copy.deepcopy(model)
    linears = lora.targets_of(merged)
    with torch.no_grad():
        for target, (a, b) in chosen.weights.items():
            linears[target].weight += 0.5 * chosen.scaling * b @ a
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([900, 500, 10]), torch.tensor([1, 2, 10])
    rows = lora.Rows.of([(None, 1), (lora.Choice(chosen, 0.5), 1), (None, 1)], x.device)
    with torch.inference_mode():
        with lora.applied(model, rows):
            adapted = model(x, t, y)
        want, base = merged(x, t, y), model(x, t, y)
    torch.testing.assert_close(adapted[1], want[1], rtol=1e-5, atol=1e-5)
    assert torch.equal(adapted[[0, 2]], base[[0, 2]])
    assert (want[1] - base[1]).abs().max() > 1e-2


def test_the_shipped_adapter_loads_strictly_on_its_base() -> None:
    directory = Path(__file__).parents[2] / "model" / "weights" / "adapters" / "bold-strokes"
    meta = lora.read_meta(directory)
    base = registry.load(meta["base"]).pipeline.model
    adapter = lora.load(directory, base)
    assert len(adapter.weights) == len(lora.targets_of(base))  # every targetable linear
    assert "train-adapter" in adapter.card["command"]
