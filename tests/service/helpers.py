"""Helpers the service tests share (imported from here, never from another test module): real
redis-servers and Redis Clusters, ``skipdit worker`` processes, settings and an app with its
lifespan running (in process, or on a real uvicorn), a client's load of submissions, metrics
and image checks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import av
import httpx
import numpy as np
import redis
import uvicorn
from PIL import Image, ImageSequence
from prometheus_client.parser import text_string_to_metric_families

from model.networks.checkpoint import load_pretrained
from model.sampling.pipeline import Pipeline
from service.api import build_app
from service.queue.keys import Keys
from service.request import GenerateParams
from service.settings import Settings
from tests.helpers import generate, require_marker

TERMINAL = {"done", "failed", "cancelled", "expired"}


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
        require_marker("redis", "starts a redis-server")
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
        require_marker("cluster", "starts a Redis Cluster")
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


def redis_client(settings: Settings) -> redis.Redis | redis.RedisCluster:
    """A client of the settings' Redis (a cluster client on a cluster), to look at keys."""
    assert settings.redis_url is not None
    client = redis.RedisCluster if settings.redis_cluster else redis.Redis
    return client.from_url(settings.redis_url)


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


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[int]:
    """The app on a real uvicorn on a free loopback port (its lifespan running); the port."""
    port = free_port()
    config = uvicorn.Config(build_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "uvicorn did not start"
        await asyncio.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


class Workers:
    """Starts ``skipdit worker`` processes against one Redis prefix (``cluster``: ``url`` names a
    node of a Redis Cluster)."""

    def __init__(self, url: str, model_dir: Path, prefix: str, cluster: bool = False):
        self.url, self.model_dir, self.prefix, self.cluster = url, model_dir, prefix, cluster
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, **env: str) -> subprocess.Popen:
        """A worker named ``name``; ``env`` adds or overrides variables ("" unsets one)."""
        require_marker("redis", "starts a worker process on Redis")
        environ = os.environ | {
            "SKIPDIT_REDIS_URL": self.url,
            "SKIPDIT_REDIS_PREFIX": self.prefix,
            "SKIPDIT_REDIS_CLUSTER": str(self.cluster).lower(),
            "SKIPDIT_MODEL": str(self.model_dir),
            "SKIPDIT_WORKER_NAME": name,
            "SKIPDIT_CLAIM_IDLE_S": "1.5",
            "SKIPDIT_HEARTBEAT_S": "0.2",
            "SKIPDIT_MAX_STEPS": "1000",
            **env,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env={k: v for k, v in environ.items() if v != ""},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs[name] = proc
        return proc

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()


def api_settings(workers: Workers, **kw: object):
    return settings_for(
        "cluster" if workers.cluster else "redis", workers.model_dir, workers.url,
        redis_prefix=workers.prefix, run_worker=False, claim_idle_s=1.5, **kw,
    )  # fmt: skip


async def wait_for(client: httpx.AsyncClient, job_id: str, check, timeout: float = 60) -> dict:
    async with asyncio.timeout(timeout):
        while True:
            record = (await client.get(f"/jobs/{job_id}")).json()
            if check(record):
                return record
            await asyncio.sleep(0.05)


def event_types(workers: Workers, job_id: str) -> list[str]:
    entries = redis_client(api_settings(workers)).xrange(Keys(workers.prefix).events(job_id))
    return [json.loads(fields[b"e"])["type"] for _, fields in entries]


async def a_killed_workers_job_is_finished_by_another_exactly_once(workers: Workers) -> None:
    """Worker a is SIGKILLed in the middle of a job; worker b, started then, runs it again from
    the start and finishes it, once (test_redis_workers on a plain Redis, test_redis_cluster on a
    cluster)."""
    workers.start("a")
    async with running_app(api_settings(workers)) as client:
        job_id = (await client.post("/generate", json={"steps": 1000, "async": True})).json()["id"]
        running = await wait_for(client, job_id, lambda r: r["step"] >= 20)
        assert running["worker"] == "a"
        workers.procs["a"].send_signal(signal.SIGKILL)
        workers.procs["a"].wait(10)
        workers.start("b")
        done = await wait_for(client, job_id, lambda r: r["status"] == "done", timeout=120)
        result = await client.get(f"/jobs/{job_id}/result")
    assert done["worker"] == "b" and result.status_code == 200
    types = event_types(workers, job_id)
    assert types.count("done") == 1 and types[-1] == "done"
    assert types.count("started") == 2  # ran on a, then again from the start on b


async def until_ready(
    client: httpx.AsyncClient, check: Callable[[dict], bool], timeout: float = 30
) -> dict:
    """/readyz once ``check`` holds (workers advertise their models with their heartbeat)."""
    async with asyncio.timeout(timeout):
        while True:
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            if check(ready.json()):
                return ready.json()
            await asyncio.sleep(0.05)


class Load:
    """Submits async jobs of ``steps`` steps one after another until stopped; sorts the
    answers."""

    def __init__(self, client: httpx.AsyncClient, steps: int = 20):
        self.client = client
        self.steps = steps
        self.accepted: list[str] = []  # 202: ids, in order
        self.refused = 0  # 503: Redis was down
        self.stop = asyncio.Event()

    async def run(self) -> None:
        seed = 0
        while not self.stop.is_set():
            body = {"class_label": seed % 10, "steps": self.steps, "seed": seed, "async": True}
            response = await self.client.post("/generate", json=body)
            if response.status_code == 202:
                self.accepted.append(response.json()["id"])
            else:
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "backend_unavailable"
                self.refused += 1
            seed += 1
            await asyncio.sleep(0.02)  # a steady stream, not a flood

    async def settle(self, submitting: asyncio.Task, timeout: float) -> tuple[list, list]:
        """Stop submitting, wait until every accepted job's event stream has ended (it ends
        with the job); each job's record and the status of its result."""
        self.stop.set()
        await submitting
        async with asyncio.timeout(timeout):
            for job_id in self.accepted:
                assert (await self.client.get(f"/jobs/{job_id}/events")).status_code == 200
        records = [(await self.client.get(f"/jobs/{i}")).json() for i in self.accepted]
        results = [(await self.client.get(f"/jobs/{i}/result")).status_code for i in self.accepted]
        return records, results

    def terminal_events(self, r: redis.Redis, keys: Keys) -> list[list[str]]:
        """Each accepted job's terminal events, read from its event stream."""
        return [
            [t for _, f in r.xrange(keys.events(i)) if (t := json.loads(f[b"e"])["type"])
             in TERMINAL]
            for i in self.accepted
        ]  # fmt: skip

    async def until(self, check, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not check():
                await asyncio.sleep(0.02)


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(name, labels): value}."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(values: dict, name: str, **labels: str) -> float | None:
    return values.get((name, frozenset(labels.items())))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)


def pipeline_of(model_dir: str) -> Pipeline:
    model, card = load_pretrained(model_dir)
    return Pipeline(model, default_guidance=card["default_guidance"])


def assert_solo(pipeline: Pipeline, body: dict, encoded: str) -> None:
    """The served image is the request run alone on ``pipeline`` (within 1/255)."""
    params = GenerateParams(**{k: v for k, v in body.items() if k != "model"})
    (solo,) = generate(pipeline, [params])
    expected = solo.images[0, ..., 0].numpy().astype(np.int16)
    assert np.abs(pixels(base64.b64decode(encoded)) - expected).max() <= 1


def mp4_frames(data: bytes) -> list[np.ndarray]:
    """The decoded (H, W, 3) frames of an MP4."""
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return frames


def webp_frames(data: bytes) -> np.ndarray:
    """(F, H, W) frames of a lossless animated WebP."""
    image = Image.open(io.BytesIO(data))
    return np.stack(
        [np.asarray(f.convert("L"), dtype=np.int16) for f in ImageSequence.Iterator(image)]
    )
