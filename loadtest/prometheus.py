"""A private Prometheus for load runs: its own process on a free port, its TSDB in a temp dir,
scraping the given targets every second; and its HTTP query API.

    with Prometheus(stack.metrics_targets) as prom:
        ...  # load
        prom.wait_scraped(after=time.time())
        series = query_range(prom.url, "rate(skipdit_steps_total[15s])", t0, t1, step=1)

Needs the ``prometheus`` binary (Debian: ``apt-get install prometheus``); a system service
that the package may start on :9090 does not matter, this one takes a free port.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from loadtest.stack import free_port

SCRAPE_INTERVAL_S = 1


class PrometheusMissing(RuntimeError):
    pass


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        raise PrometheusMissing(
            "no `prometheus` binary on PATH: install it (Debian: `apt-get install prometheus`)"
        )
    return found


def scrape_config(targets: Sequence[str], interval_s: int = SCRAPE_INTERVAL_S) -> dict:
    """Prometheus config (JSON is YAML) scraping ``host:port/metrics`` of each target."""
    every = f"{interval_s}s"
    return {
        "global": {"scrape_interval": every, "scrape_timeout": every, "evaluation_interval": every},
        "scrape_configs": [
            {"job_name": "skipdit", "static_configs": [{"targets": list(targets)}]},
        ],
    }


class Prometheus:
    """``prometheus`` scraping ``targets`` (``host:port``) while the block runs."""

    def __init__(self, targets: Sequence[str], log: Path | None = None, ready_timeout: float = 60):
        if not targets:
            raise ValueError("Prometheus needs at least one scrape target")
        self.targets = list(targets)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> Prometheus:
        binary = prometheus_binary()
        self._tmp = tempfile.TemporaryDirectory(prefix="skipdit-prom-")
        config = Path(self._tmp.name) / "prometheus.yml"
        config.write_text(json.dumps(scrape_config(self.targets), indent=1))
        argv = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self._tmp.name}/data",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        out = self.log.open("wb") if self.log is not None else subprocess.DEVNULL
        self._proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"prometheus exited {self._proc.returncode} (log: {self.log})")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready on {self.url} after {self.ready_timeout} s")

    def wait_scraped(self, after: float, timeout: float = 30) -> None:
        """Until every target has been scraped successfully at a time later than ``after``
        (Unix seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ups = query(self.url, "timestamp(up) and up == 1")  # when last scraped
            if len(ups) == len(self.targets) and all(float(s["value"][1]) > after for s in ups):
                return
            time.sleep(0.2)
        raise TimeoutError(f"targets {self.targets} not all scraped after {after} in {timeout} s")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _api(url: str, path: str, params: dict[str, str | float]) -> list[dict]:
    response = httpx.post(f"{url}/api/v1/{path}", data=params, timeout=30)
    body = response.json()
    if response.status_code != 200 or body.get("status") != "success":
        raise RuntimeError(
            f"prometheus {path} failed ({response.status_code}): "
            f"{body.get('error')} for {params['query']!r}"
        )
    return body["data"]["result"]


def query(url: str, expr: str) -> list[dict]:
    """Instant query now: ``[{"metric": {label: value}, "value": [t, "v"]}, ...]``."""
    return _api(url, "query", {"query": expr})


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict]:
    """Range query, evaluated at ``start + k * step`` up to ``end`` (Unix seconds):
    ``[{"metric": {label: value}, "values": [[t, "v"], ...]}, ...]``."""
    return _api(url, "query_range", {"query": expr, "start": start, "end": end, "step": step})


def version(url: str) -> str:
    """The server's version, e.g. ``2.42.0+ds``."""
    return httpx.get(f"{url}/api/v1/status/buildinfo", timeout=10).json()["data"]["version"]
