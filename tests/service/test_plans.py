"""One plan per request: the defaults ``GET /models`` shows are what a request that names no cache
field runs, each request is resolved and checked once end to end, and every published limit is
the line between accepted and refused."""

from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path

import pytest
from diffusers import DDIMScheduler

from model import registry
from model.cache import POLICIES, CachePolicy
from model.errors import FieldError
from service.request import FIELDS, GenerateParams, limits, resolve
from service.settings import Settings
from tests.service.helpers import RedisServer, running_app, settings_for

SHIPPED = ["digits-skip-dit", "digits-dit", "digits-skip-dydit", "digits-video-skip"]


def expected_cached(config: dict, steps: int) -> int:
    """Skip-Cache's rule, written out: step i is cached unless it is the first, i % N == 0, or
    its timestep is at or past a window edge (t >= t_start, t <= t_end; None is infinity)."""
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(steps)
    t_start = math.inf if config["t_start"] is None else config["t_start"]
    return sum(
        1
        for i, t in enumerate(int(t) for t in scheduler.timesteps)
        if i > 0 and i % config["interval"] != 0 and config["t_end"] < t < t_start
    )


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_a_request_naming_no_cache_field_runs_the_default_models_shows(
    backend: str, redis_url: str | None
) -> None:
    settings = settings_for(backend, Path(), redis_url, models=SHIPPED[:2])
    async with running_app(settings) as client:
        models = {m["id"]: m for m in (await client.get("/models")).json()["data"]}
        ran = {}
        for name in SHIPPED[:2]:
            body = {"model": name, "class_label": 3, "steps": 10, "seed": 1}
            response = await client.post("/generate", json=body)
            assert response.status_code == 200, response.text
            ran[name] = response.json()
        skip = models["digits-skip-dit"]["default_cache"]
        explicit = await client.post(
            "/generate",
            json={"model": "digits-skip-dit", "class_label": 3, "steps": 10, "seed": 1}
            | {"cache_policy": "skip_cache", "cache_interval": skip["config"]["interval"]},
        )
    # The card's recommendation for the Skip-DiT, none for the vanilla DiT.
    assert (skip["policy"], skip["source"], skip["config"]["interval"]) == ("skip_cache", "card", 2)
    plain = models["digits-dit"]["default_cache"]
    assert (plain["policy"], plain["source"], plain["config"]) == ("none", "none", {})
    out = ran["digits-skip-dit"]
    assert out["result"]["steps_cached"] == expected_cached(skip["config"], 10) > 0
    echoed = {k: out["request"][k] for k in ("cache_interval", "cache_depth", "cache_t_end")}
    assert echoed == {
        "cache_interval": skip["config"]["interval"],
        "cache_depth": skip["config"]["depth"],
        "cache_t_end": skip["config"]["t_end"],
    }
    assert out["request"]["cache_policy"] == out["result"]["cache_policy"] == "skip_cache"
    assert explicit.json()["images"] == out["images"]  # the default is that request, exactly
    dit = ran["digits-dit"]
    assert dit["result"]["steps_cached"] == 0 and dit["request"]["cache_policy"] == "none"


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_cache_interval_1_is_no_cache_bit_for_bit(
    backend: str, redis_url: str | None
) -> None:
    settings = settings_for(backend, Path(), redis_url, model="digits-skip-dit")
    body = {"class_label": 5, "steps": 12, "seed": 4, "num_images": 2}
    async with running_app(settings) as client:
        one = (await client.post("/generate", json=body | {"cache_interval": 1})).json()
        none = (await client.post("/generate", json=body | {"cache_policy": "none"})).json()
        default = (await client.post("/generate", json=body)).json()
    assert one["result"]["steps_cached"] == none["result"]["steps_cached"] == 0
    assert one["images"] == none["images"]
    assert default["result"]["steps_cached"] > 0 and default["images"] != none["images"]


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_one_request_is_resolved_and_checked_once_end_to_end(
    backend: str, redis_url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """API, queue, worker, engine and pipeline: one policy configuration, one check of its
    config, for one request (the worker runs the stored plan as it is)."""
    counts: collections.Counter[str] = collections.Counter()
    configure = CachePolicy.configure

    def counted_configure(self, model, **params):
        counts["configure"] += 1
        return configure(self, model, **params)

    monkeypatch.setattr(CachePolicy, "configure", counted_configure)
    for policy in POLICIES.values():
        check = policy.config_cls.check

        def counted_check(config, _check=check):
            counts["check"] += 1
            return _check(config)

        monkeypatch.setattr(policy.config_cls, "check", counted_check)
    settings = settings_for(backend, Path(), redis_url, model="digits-skip-dit")
    async with running_app(settings) as client:
        counts.clear()  # start-up is not the request's
        response = await client.post("/generate", json={"class_label": 2, "steps": 6})
        assert response.status_code == 200, response.text
        assert response.json()["result"]["steps_cached"] > 0
        assert counts == {"configure": 1, "check": 1}
        counts.clear()
        refused = await client.post("/generate", json={"steps": 6, "cache_depth": 9})
        assert refused.json()["error"]["field"] == "cache_depth"
        assert counts == {"configure": 1}  # refused by its check of the model, before any run


async def walk(client, name: str, field: str, value: object, extra: dict) -> int:
    body = {"model": name, "async": True, "steps": 2} | extra | {field: value}
    response = await client.post("/generate", json=body)
    if response.status_code == 422:
        assert response.json()["error"]["field"] == field, response.text
    return response.status_code


async def test_every_published_limit_is_accepted_and_one_past_it_is_refused(
    redis_server: RedisServer,
) -> None:
    """Every shipped model, with the API alone (jobs queue, nothing runs): each range
    ``GET /models`` publishes is accepted at both ends and refused one past either."""
    settings = settings_for(
        "redis", Path(), redis_server.url, models=SHIPPED, run_worker=False, max_steps=250
    )
    async with running_app(settings) as client:
        models = (await client.get("/models")).json()["data"]
        assert [m["id"] for m in models] == SHIPPED
        walked = collections.Counter()
        for model in models:
            limits = model["limits"]
            assert {"steps", "num_images", "class_label", "guidance_scale"} <= set(limits)
            assert ("num_frames" in limits) == (model["kind"] == "video")
            for field, bounds in limits.items():
                if not isinstance(bounds, dict):
                    continue  # the budget's figures, not a field
                step = 1 if isinstance(bounds["max"], int) else 1.0
                for value, status in (
                    (bounds["max"], 202),
                    (bounds["max"] + step, 422),
                    (bounds["min"], 202),
                    (bounds["min"] - step, 422),
                ):
                    got = await walk(client, model["id"], field, value, {})
                    assert got == status, (model["id"], field, value)
                    walked[field] += 1
                if "without_guidance" in bounds:
                    off = {"guidance_scale": 1.0}
                    top = bounds["without_guidance"]
                    assert await walk(client, model["id"], field, top, off) == 202
                    assert await walk(client, model["id"], field, top + 1, off) == 422
    assert walked["num_frames"] == 4 and walked["steps"] == 4 * len(SHIPPED)


async def test_a_model_dependent_limit_says_which_limit_and_why(
    redis_server: RedisServer,
) -> None:
    settings = settings_for(
        "redis", Path(), redis_server.url, model="digits-video-skip", run_worker=False
    )
    async with running_app(settings) as client:
        limits = (await client.get("/models")).json()["data"][0]["limits"]
        images = limits["num_images"]
        assert images["max"] < images["without_guidance"] == settings.max_num_images
        response = await client.post("/generate", json={"num_images": images["max"] + 1})
    error = response.json()["error"]
    assert error["field"] == "num_images"
    assert f"must be in [1, {images['max']}]" in error["message"]
    assert f"batch budget is {settings.max_batch_tokens} tokens" in error["message"]
    assert "guidance on" in error["message"]


def test_the_field_table_names_every_policy_and_real_parameters() -> None:
    assert set(FIELDS) == set(POLICIES)
    for name, fields in FIELDS.items():
        own = {f.name for f in dataclasses.fields(POLICIES[name].config_cls)}
        assert set(fields.values()) <= own, name
        assert all(f in GenerateParams.model_fields for f in fields), name


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cache_depth": 4}, "cache_depth"),  # skip_cache's depth: at most 3 of 6 blocks
        ({"cache_policy": "delta_dit", "cache_depth": 4}, "cache_depth"),  # delta_dit's blocks
        ({"cache_t_start": 10, "cache_t_end": 20}, "cache_t_end"),
        ({"cache_policy": "toca", "cache_threshold": 0.1}, "cache_threshold"),
        ({"class_label": 10}, "class_label"),
        ({"dynamic": False}, "dynamic"),  # not a DyDiT
        ({"guidance_scale": 3}, "guidance_scale"),  # on a model without a null class, below
    ],
)
def test_errors_from_the_model_layer_name_the_request_field(body: dict, field: str) -> None:
    info = registry.describe("digits-skip-dit")
    if field == "guidance_scale":  # a model without a null class
        info = dataclasses.replace(info, config=info.config.replace(class_dropout_prob=0.0))
    with pytest.raises(FieldError) as err:
        resolve(GenerateParams(**body), info)
    assert err.value.field == field and str(err.value).startswith(f"{field}: ")


def test_a_deployment_default_overrides_the_card_and_is_checked_at_boot() -> None:
    info = registry.describe("digits-skip-dit")
    off = Settings(model="digits-skip-dit", cache_defaults={"digits-skip-dit": {"policy": "none"}})
    assert resolve(GenerateParams(), info, off).policy == "none"
    three = {"digits-skip-dit": {"policy": "skip_cache", "interval": 3}}
    run = resolve(GenerateParams(cache_depth=2), info, Settings(cache_defaults=three))
    assert (run.policy, run.cache.interval, run.cache.depth) == ("skip_cache", 3, 2)
    for bad, says in (
        ({"digits-skip-dit": {"policy": "nope"}}, "policy must be one of"),
        ({"digits-skip-dit": {"policy": "skip_cache", "interval": 0}}, "interval: must be >= 1"),
        ({"digits-skip-dit": {"policy": "fora", "depth": 2}}, "depth"),
        ({"not-served": {"policy": "none"}}, "not a served model"),
    ):
        with pytest.raises(ValueError, match=says):
            Settings(model="digits-skip-dit", cache_defaults=bad)


def test_published_limits_stay_within_the_schemas_caps() -> None:
    """A deployment cap above the schema's (steps <= 1000, num_images <= 16) publishes the
    schema's: a client never sees a limit the server refuses."""
    info = registry.describe("digits-skip-dit")
    wide = Settings(model="digits-skip-dit", max_steps=5000, max_num_images=64)
    published = limits(info, wide).published()
    assert (published["steps"]["max"], published["num_images"]["max"]) == (1000, 16)
    resolve(GenerateParams(steps=1000, num_images=16), info, wide)
