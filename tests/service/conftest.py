"""Service fixtures: the queue ``backend`` an app test runs on, a real redis-server and a real
3-master Redis Cluster per test session (the classes that run them, and private servers on
demand: tests/service/helpers.py), and the tiny models saved as real model directories (a
Skip-DiT, a vanilla DiT and a Skip-Latte video model)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from model.networks.checkpoint import save_pretrained
from model.networks.presets import build, preset
from tests.helpers import randomized, tiny
from tests.service.helpers import RedisClusterServers, RedisServer


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    """The queue backend an app test runs on (queue tests override it with an instance); on
    "cluster", ``redis_server`` is a node of the session's Redis Cluster."""
    return request.param


@pytest.fixture(scope="session")
def plain_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def redis_server(request: pytest.FixtureRequest) -> RedisServer:
    """The Redis a test talks to: the session's plain redis-server, or a node of the session's
    cluster when the test runs on the "cluster" ``backend``."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "cluster":
        return request.getfixturevalue("redis_cluster").nodes[0]
    return request.getfixturevalue("plain_redis")


@pytest.fixture
def redis_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """The URL of the Redis an app test on ``backend`` talks to; None on "memory", which starts
    no redis-server (so a memory test neither needs one nor carries the ``redis`` marker)."""
    if backend == "memory":
        return None
    return request.getfixturevalue("redis_server").url


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    card = {"name": "tiny", "default_guidance": 2.0}
    return save_pretrained(tiny(), tmp_path_factory.mktemp("models") / "tiny", card=card)


@pytest.fixture(scope="session")
def tiny_dit_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second served model: the vanilla DiT (no long skips), other weights."""
    card = {"name": "tiny-dit", "default_guidance": 3.0}
    model = tiny(seed=1, long_skip=False)
    return save_pretrained(model, tmp_path_factory.mktemp("models") / "tiny-dit", card=card)


@pytest.fixture(scope="session")
def tiny_video_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A video model: Skip-Latte ``digits-video-tiny`` (4 frames of 8x8 grey, 10 classes)."""
    torch.manual_seed(2)
    model = randomized(build(preset("digits-video-tiny")), seed=2)
    card = {"name": "tiny-video", "default_guidance": 2.0}
    return save_pretrained(model, tmp_path_factory.mktemp("models") / "tiny-video", card=card)
