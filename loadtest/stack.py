"""The service as separate processes on 127.0.0.1, for benchmarks and load tests.

``Stack(workers=0)``: one ``skipdit serve`` with its embedded worker (the default deployment).
``Stack(workers=N)``: a private redis-server (free port, temp dir; AOF with ``appendfsync always``
as deploy/ runs it, or ``aof="everysec"``/``"off"`` to compare), ``skipdit serve`` as API only
and N ``skipdit worker`` processes, each serving /metrics on a port of its own
(``metrics_targets``: the API's and theirs, for Prometheus). Leaving the block stops them all
(SIGTERM, so workers drain; SIGKILL after a grace period).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_ready(client: httpx.AsyncClient, timeout: float = 120) -> None:
    """Until /readyz answers 200 and every served model is held by a live worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = await client.get("/readyz")
            models = response.json().get("models", {}) if response.status_code == 200 else {}
            if models and all(m["held"] for m in models.values()):
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.25)
    raise TimeoutError("service did not become ready")


AOF = ("always", "everysec", "off")  # the private Redis's persistence: deploy/ runs "always"


def add_aof_option(parser: argparse.ArgumentParser) -> None:
    """``--aof``: the private Redis's persistence, as a command line sets ``Stack(aof=...)``."""
    parser.add_argument(
        "--aof", choices=AOF, default="always", help="Redis persistence (deploy/: always)"
    )


class Stack:
    def __init__(
        self,
        workers: int = 0,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        aof: str = "always",
    ):
        if aof not in AOF:
            raise ValueError(f"aof must be one of {AOF}, not {aof!r}")
        self.workers = workers
        self.aof = aof
        self.env = os.environ | {"SKIPDIT_LOG_LEVEL": "WARNING"} | (env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_metrics_ports = [free_port() for _ in range(workers)]
        self.log_dir = log_dir
        self._procs: list[subprocess.Popen] = []
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Stack:
        self._tmp = tempfile.TemporaryDirectory()
        env = dict(self.env)
        if self.workers:
            redis_port = free_port()
            env["SKIPDIT_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
            redis = shutil.which("redis-server") or "redis-server"
            argv = [redis, "--port", str(redis_port), "--save", "", "--dir", self._tmp.name]
            if self.aof != "off":
                argv += ["--appendonly", "yes", "--appendfsync", self.aof]
            self._spawn("redis", argv, env)
        self._spawn(
            "api", [sys.executable, "-m", "service.cli", "serve", "--port", str(self.port)], env
        )
        for i, metrics_port in enumerate(self.worker_metrics_ports):
            own = {"SKIPDIT_WORKER_NAME": f"load-{i}", "SKIPDIT_METRICS_PORT": str(metrics_port)}
            self._spawn(f"worker{i}", [sys.executable, "-m", "service.cli", "worker"], env | own)
        return self

    @property
    def metrics_targets(self) -> list[str]:
        """``host:port`` of every /metrics endpoint: the API's, then each worker's."""
        return [f"127.0.0.1:{p}" for p in (self.port, *self.worker_metrics_ports)]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = (self.log_dir / f"{name}.log").open("wb")
        self._procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):  # workers and API first, Redis last
            proc.terminate()
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()
