"""Service fixtures: a real redis-server and a real 3-master Redis Cluster per test session (and
private servers on demand), the tiny models saved as real model directories (a Skip-DiT, a vanilla
DiT and a Skip-Latte video model), and an app client with its lifespan running."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest
import redis
import torch

from model.networks.checkpoint import save_pretrained
from model.networks.presets import build, preset
from service.api import build_app
from service.settings import Settings
from tests.conftest import randomized, tiny


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> str:
    """The queue backend an app test runs on (queue tests override it with an instance); on
    "cluster", ``redis_server`` is a node of the session's Redis Cluster."""
    return request.param


class Clock:
    """A clock that moves only when a test moves it (Unix seconds)."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free port, in a temp dir, no persistence unless ``args`` (more
    redis-server options, which win over the defaults) ask for it."""

    def __init__(self, workdir: Path, port: int | None = None, args: Sequence[str] = ()):
        self.workdir = workdir
        self.port = port or free_port()
        self.args = list(args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not on PATH"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class RedisClusterServers:
    """A real Redis Cluster: ``masters`` cluster-enabled redis-servers on free loopback ports, each
    in its own directory under ``workdir`` (its nodes.conf, and its AOF when ``args`` turn it
    on), every slot assigned by ``redis-cli --cluster create``, no replicas. ``args`` go to every
    node."""

    def __init__(self, workdir: Path, masters: int = 3, args: Sequence[str] = ()):
        ports = [free_port() for _ in range(masters)]
        self.nodes = [  # the bus port is a free port too: port + 10000 may pass 65535
            RedisServer(workdir / f"node-{port}", port, ["--cluster-enabled", "yes",
                        "--cluster-port", str(free_port()), *args])
            for port in ports
        ]  # fmt: skip

    @property
    def url(self) -> str:  # any node will do: the cluster client learns the rest from it
        return self.nodes[0].url

    def start(self) -> RedisClusterServers:
        """Start every node and form the cluster; a failure stops the nodes it started."""
        try:
            for node in self.nodes:
                node.workdir.mkdir(parents=True, exist_ok=True)
                node.start()
            exe = shutil.which("redis-cli")
            assert exe, "redis-cli is not on PATH"
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            subprocess.run(
                [exe, "--cluster", "create", *addresses, "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            self.wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ok(self, timeout: float = 30) -> None:
        """Until every node agrees the cluster serves every slot (bounded)."""
        self.wait_state("ok", timeout)

    def wait_state(self, state: str, timeout: float = 30) -> None:
        """Until every running node reports ``cluster_state`` ``state`` (bounded)."""
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            with redis.Redis(port=node.port) as client:
                while client.cluster("info")["cluster_state"] != state:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"cluster not {state} on port {node.port}")
                    time.sleep(0.05)

    def master_of(self, key: str) -> RedisServer:
        """The node that serves ``key``'s slot (CLUSTER KEYSLOT, then CLUSTER SLOTS)."""
        live = next(node for node in self.nodes if node.proc is not None)
        with redis.Redis(port=live.port) as client:
            slot = client.cluster("keyslot", key)
            for first, last, (_, port, *_), *_ in client.cluster("slots"):  # master first
                if first <= slot <= last:
                    return next(node for node in self.nodes if node.port == port)
        raise LookupError(f"no node serves slot {slot} of {key!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


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


def redis_client(settings: Settings) -> redis.Redis | redis.RedisCluster:
    """A client of the settings' Redis (a cluster client on a cluster), to look at keys."""
    assert settings.redis_url is not None
    client = redis.RedisCluster if settings.redis_cluster else redis.Redis
    return client.from_url(settings.redis_url)


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


def settings_for(backend: str, model_dir: Path, redis_url: str | None, **kw: object) -> Settings:
    base: dict[str, object] = {"model": str(model_dir), "max_steps": 1000, "heartbeat_s": 0.2}
    if "models" in kw:
        base["model"] = None
    base["claim_idle_s"] = 1.0
    if backend in ("redis", "cluster"):
        base |= {"redis_url": redis_url, "redis_prefix": f"t{uuid.uuid4().hex[:8]}"}
        base["redis_cluster"] = backend == "cluster"
        base.setdefault("run_worker", True)
    return Settings(**(base | kw))


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, clock: Callable[[], float] = time.time
) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(settings, clock)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            yield c
