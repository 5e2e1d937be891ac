"""The text-conditioned Skip-DiT end to end on the model layer: a tiny network with a tiny T5
encoder and a word-level tokenizer, exported the way training exports the shipped model
(``save_pretrained`` of all three) and loaded back through the registry's card path. Batched
equals alone across prompts, guidance, negative prompts and policies; the text is projected
once per request; the plan's conditioning and sampler checks."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
import torch

from model import registry
from model.errors import FieldError
from model.networks.presets import preset
from model.networks.text_dit import TextDiTConfig, TextSkipDiT
from model.sampling.pipeline import Pipeline
from model.sampling.plan import RunPlan
from tests.helpers import BATCH_TOL, tiny, tiny_text_model

CAPTIONS = ["a 7 on the left and a 2 on the right", "two digits: 3 above 8", "a large 5", ""]
# Every policy at a setting that caches on 8 steps (request field names: service.request).
POLICIES = {
    "none": {},
    "skip_cache": {"interval": 2},
    "fora": {"interval": 3},
    "fbcache": {"threshold": 0.5},
    "delta_dit": {"interval": 2},
    "toca": {"interval": 3, "ratio": 0.5},
    "teacache": {"threshold": 0.5},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_model(tmp_path_factory.mktemp("t2i") / "model")


@pytest.fixture(scope="module")
def pipeline(model_dir: Path) -> Pipeline:
    return registry.load(str(model_dir)).pipeline


def _plan(pipeline: Pipeline, prompt: str, **kw: object) -> RunPlan:
    policy = str(kw.pop("policy", "none"))
    params = POLICIES[policy] | dict(kw.pop("params", {}))  # type: ignore[arg-type]
    return pipeline.plan(prompt=prompt, policy=policy, params=params, **{"steps": 8, **kw})


def test_the_card_path_loads_the_text_model(model_dir: Path) -> None:
    info = registry.describe(str(model_dir))
    assert (info.conditioning, info.max_tokens, info.samplers) == ("text", 8, ("flow_euler",))
    loaded = registry.load(str(model_dir))
    assert isinstance(loaded.pipeline.model, TextSkipDiT)
    assert loaded.pipeline.prompting is not None
    assert (model_dir / "text_encoder" / "config.json").is_file()
    assert (model_dir / "tokenizer" / "tokenizer.json").is_file()


def test_batched_equals_alone_across_prompts_guidance_negatives_and_policies(
    pipeline: Pipeline,
) -> None:
    plans = [
        _plan(pipeline, CAPTIONS[0], guidance=1.0, seed=1, policy="skip_cache"),
        _plan(pipeline, CAPTIONS[1], guidance=2.0, seed=2, policy="fora"),
        _plan(pipeline, CAPTIONS[2], guidance=4.5, seed=3, negative_prompt="a small 3"),
        _plan(pipeline, "a 1 on the right", guidance=3.0, seed=4, policy="toca", num_images=2),
        _plan(pipeline, CAPTIONS[0], guidance=2.0, seed=5, policy="teacache"),
        _plan(pipeline, CAPTIONS[1], guidance=2.0, seed=6, policy="fbcache"),
        _plan(pipeline, CAPTIONS[2], guidance=2.0, seed=7, policy="delta_dit"),
    ]
    together = pipeline.generate(plans)
    assert {len(p.prompt or "") for p in plans} != 1  # prompts of different lengths
    for plan, batched in zip(plans, together, strict=True):
        (alone,) = pipeline.generate([plan])
        torch.testing.assert_close(batched.latents, alone.latents, **BATCH_TOL)
        assert batched.stats.steps == alone.stats.steps
    assert together[0].stats.steps[max(together[0].stats.steps)] > 0  # it cached
    # the negative prompt is what the unconditional branch sees: another image
    (empty,) = pipeline.generate([_plan(pipeline, CAPTIONS[2], guidance=4.5, seed=3)])
    assert not torch.allclose(empty.latents, together[2].latents, **BATCH_TOL)


def test_text_is_encoded_and_projected_once_per_request(pipeline: Pipeline) -> None:
    """Over whole runs (8 steps, cached steps too), the encoder runs once per batch of misses
    and every block's key/value projection (and the pooled text) once per request; the queries
    every step."""
    model = pipeline.model
    assert isinstance(model, TextSkipDiT) and pipeline.prompting is not None
    calls = {"encoder": 0, "kv": 0, "q": 0, "pool": 0}

    def count(name: str):
        def hook(*_: object) -> None:
            calls[name] += 1

        return hook

    assert model.text_pool is not None  # digits-t2i-tiny pools the text too
    handles = [
        pipeline.prompting.encoder.model.register_forward_hook(count("encoder")),
        model.text_pool.register_forward_hook(count("pool")),
    ]
    for block in model.text_blocks:
        handles.append(block.cross_attn.kv_linear.register_forward_hook(count("kv")))
        handles.append(block.cross_attn.q_linear.register_forward_hook(count("q")))
    try:
        fresh = ["a 4 at the top", "the digit 9 on the left", "a 4 at the top"]
        plans = [
            _plan(pipeline, p, seed=i, policy="skip_cache", guidance=2.0)
            for i, p in enumerate(fresh)
        ]
        pipeline.generate(plans)
    finally:
        for handle in handles:
            handle.remove()
    depth = len(model.text_blocks)
    assert calls["encoder"] == 1  # the misses of the three requests, one batch
    assert calls["kv"] == len(plans) * depth
    assert calls["pool"] == len(plans)  # the pooled text too: once per request, with its keys
    assert calls["q"] > calls["kv"]  # the steps ran cross-attention on the stored keys


def test_repeats_hit_the_embedding_cache(pipeline: Pipeline) -> None:
    assert pipeline.prompting is not None
    cache = pipeline.prompting.cache
    pipeline.generate([_plan(pipeline, "a small 6 on the right", steps=2)])
    hits, misses = cache.hits, cache.misses
    pipeline.generate([_plan(pipeline, "a small 6 on the right", steps=2)])
    assert (cache.hits - hits, cache.misses - misses) == (2, 0)  # prompt and empty prompt


def test_truncation_is_reported(pipeline: Pipeline) -> None:
    long = "a 7 on the left and a 2 on the right and a 3 at the top"
    short, cut = pipeline.generate(
        [_plan(pipeline, "a large 5", steps=1), _plan(pipeline, long, steps=1)]
    )
    assert short.prompt_report is not None and cut.prompt_report is not None
    assert (short.prompt_report.tokens, short.prompt_report.truncated) == (4, False)
    assert (cut.prompt_report.tokens, cut.prompt_report.truncated) == (8, True)


def test_plans_check_the_conditioning_and_the_sampler(pipeline: Pipeline) -> None:
    with pytest.raises(FieldError) as e:
        pipeline.plan(prompt="a 5", class_label=3)
    assert e.value.field == "class_label"
    with pytest.raises(FieldError) as e:
        pipeline.plan()
    assert e.value.field == "prompt"
    with pytest.raises(FieldError) as e:
        pipeline.plan(prompt="a 5", sampler="ddim")
    assert e.value.field == "sampler"
    assert pipeline.plan(prompt="a 5").sampler == "flow_euler"
    image = Pipeline(tiny())
    for field in ("prompt", "negative_prompt"):
        with pytest.raises(FieldError) as e:
            image.plan(**{field: "a red cat on a sofa"})
        assert e.value.field == field
    with pytest.raises(FieldError) as e:
        image.plan(sampler="flow_euler")
    assert e.value.field == "sampler"


def test_pooled_text_reaches_every_block_through_the_timestep_embedding() -> None:
    """``pooled_text``: with every cross-attention output zero (their init), two prompts still
    give different outputs, through the pooled text added to the timestep embedding; with the
    pool zeroed too, the same."""
    torch.manual_seed(0)
    model = TextSkipDiT(cast(TextDiTConfig, preset("digits-t2i-tiny"))).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    assert model.text_pool is not None
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([400.0, 400.0])
    hidden, mask = torch.randn(2, 5, model.config.text_dim), torch.ones(2, 5)
    with torch.no_grad():
        out = model(x, t, model.encode_text(hidden, mask))
        swapped = model(x, t, model.encode_text(hidden.flip(0), mask))
        assert not torch.allclose(out, swapped)
        torch.nn.init.zeros_(model.text_pool.weight)
        torch.nn.init.zeros_(model.text_pool.bias)
        out = model(x, t, model.encode_text(hidden, mask))
        swapped = model(x, t, model.encode_text(hidden.flip(0), mask))
        assert torch.equal(out, swapped)


def test_text_values_from_the_embeddings_split_keys_and_values(tmp_path: Path) -> None:
    """``text_values="embeddings"``: every block's keys come from the encoder's last hidden
    states (the first ``text_dim`` features) and its values (and the pooled text) from the
    input token embeddings (the rest); the served model's encoder gives both side by side, the
    second half its embedding table's rows."""
    torch.manual_seed(0)
    config = cast(TextDiTConfig, preset("digits-t2i-tiny")).replace(text_values="embeddings")
    model = TextSkipDiT(config).eval()
    d = config.text_dim
    assert config.text_width == 2 * d
    hidden = torch.randn(2, 5, 2 * d)
    mask = torch.ones(2, 5)
    other_keys, other_values = hidden.clone(), hidden.clone()
    other_keys[..., :d] += 1.0
    other_values[..., d:] += 1.0
    with torch.no_grad():
        base, keys, values = (
            model.encode_text(h, mask) for h in (hidden, other_keys, other_values)
        )
    assert base.pooled is not None and keys.pooled is not None and values.pooled is not None
    for (k, v), (k_keys, v_keys), (k_values, v_values) in zip(
        base.kv, keys.kv, values.kv, strict=True
    ):
        assert torch.equal(v, v_keys) and not torch.allclose(k, k_keys)
        assert torch.equal(k, k_values) and not torch.allclose(v, v_values)
    assert torch.equal(base.pooled, keys.pooled)
    assert not torch.allclose(base.pooled, values.pooled)
    with pytest.raises(ValueError, match="text features"):
        model.encode_text(hidden[..., :d], mask)
    directory = tiny_text_model(tmp_path / "factored", text_values="embeddings")
    pipeline = registry.load(str(directory)).pipeline  # its encoder gives both halves
    assert pipeline.prompting is not None and pipeline.prompting.encoder.with_embeddings
    (result,) = pipeline.generate([pipeline.plan(prompt="a 7 on the left", steps=2)])
    assert result.images is not None and result.images.shape == (1, 32, 32, 1)


def test_an_encoder_with_embeddings_gives_its_rows_beside_its_states(tmp_path: Path) -> None:
    from model.text.encoder import TextEncoder

    directory = tiny_text_model(tmp_path / "model")
    plain = TextEncoder.load(directory / "text_encoder", directory / "tokenizer", 8, "cpu")
    both = TextEncoder.load(
        directory / "text_encoder", directory / "tokenizer", 8, "cpu", with_embeddings=True
    )
    prompts = ["a 7 on the left", "a large 5"]
    alone, side_by_side = plain.encode(prompts), both.encode(prompts)
    d = alone.hidden.shape[-1]
    assert side_by_side.hidden.shape[-1] == 2 * d
    assert torch.equal(side_by_side.hidden[..., :d], alone.hidden)
    ids, _ = both.tokenize(prompts)
    table = both.model.get_input_embeddings().weight
    assert torch.equal(side_by_side.hidden[..., d:], table[ids])


def test_rotary_positions_move_the_absolute_table_to_the_cross_attention_queries(
    tmp_path: Path,
) -> None:
    """``positions="rope"``: the tokens carry no position (``pos_embed`` zero), every
    self-attention rotates by the 2-D rotary tables and every cross-attention's queries add the
    sin-cos table; the tables are computed, not stored, so an export loads back to the same
    network; a text-to-video config refuses it."""
    torch.manual_seed(0)
    config = cast(TextDiTConfig, preset("digits-t2i-tiny")).replace(positions="rope")
    model = TextSkipDiT(config).eval()
    absolute = TextSkipDiT(config.replace(positions="absolute"))
    assert model.pos_embed.abs().max() == 0
    for cross in model.cross_attentions:
        assert cross.query_pos is not None
        assert torch.equal(cross.query_pos, absolute.pos_embed)
    assert set(model.state_dict()) == set(absolute.state_dict())  # no table is a weight
    for cross in model.cross_attentions:  # cross-attention outputs start at zero: wake them
        torch.nn.init.normal_(cross.proj.weight, std=0.1)
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([400.0, 30.0])
    text, mask = torch.randn(2, 5, config.text_width), torch.ones(2, 5)
    with torch.no_grad():
        out = model(x, t, model.encode_text(text, mask))
        for block in model.text_blocks:  # without the rotation: another network
            block.attn.rope_sin.zero_()
            block.attn.rope_cos.fill_(1.0)
        unrotated = model(x, t, model.encode_text(text, mask))
    assert not torch.allclose(out, unrotated)
    from model.networks.checkpoint import load_pretrained, save_pretrained

    fresh = TextSkipDiT(config).eval()
    fresh.load_state_dict(model.state_dict())  # the tables as built, not as zeroed above
    save_pretrained(fresh, tmp_path / "rope", card={"name": "rope"})
    loaded, _ = load_pretrained(tmp_path / "rope")
    with torch.no_grad():
        context = fresh.encode_text(text, mask)
        torch.testing.assert_close(loaded(x, t, context), fresh(x, t, context))
    with pytest.raises(ValueError, match="positions"):
        preset("digits-t2v-tiny", positions="rope")
