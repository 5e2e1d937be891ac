"""The provisioned dashboard drawn from a real Prometheus that scraped the real service: the
embedded stack serves a few requests, every panel's queries (with Grafana's variables
substituted) return series for what those requests exercised, and the PNG is written."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import httpx
import pytest

from loadtest.prometheus import Prometheus, query
from loadtest.render_dashboard import grafana_variables, regex_literal, render, substitute
from loadtest.stack import Stack, wait_ready

# Panels the requests below exercise, and how many series each must have (a model at least).
EXERCISED = {
    "Request latency (done jobs)": 3,  # p50, p95, p99
    "Queue wait": 3,
    "Queue depth": 1,
    "In flight": 1,
    "Batch size": 2,  # mean, p95
    "Steps: full vs cached": 1,
    "Step time by mode": 2,  # p50, p95 of the mode that ran
    "Speedup": 2,  # mean, p50
    "Jobs ended by status": 1,  # done
}


def test_grafana_variables_are_substituted_into_valid_promql() -> None:
    dashboard = {"templating": {"list": [{"name": "model", "allValue": ".*"}]}}
    variables = grafana_variables(dashboard, None, "15s", 2.0, 0.0, 90.0)
    expr = 'rate(x{model=~"$model"}[$__rate_interval]) * ${__range_s} / [[__interval_ms]]'
    assert substitute(expr, variables) == 'rate(x{model=~".*"}[15s]) * 90 / 2000'
    one = grafana_variables(dashboard, "digits-dit.v2", "15s", 1.0, 0.0, 1.0)
    assert one["model"] == regex_literal("digits-dit.v2") == "digits-dit\\\\.v2"
    with pytest.raises(KeyError, match=r"\$cluster"):
        substitute('up{cluster="$cluster"}', variables)


@pytest.mark.slow
def test_the_dashboard_renders_from_prometheus_over_a_real_run(tmp_path: Path) -> None:
    if shutil.which("prometheus") is None:
        pytest.skip("no `prometheus` binary (Debian: apt-get install prometheus)")
    with Stack(workers=0) as stack, Prometheus(stack.metrics_targets) as prom:
        asyncio.run(_ready(stack.url))
        with httpx.Client(base_url=stack.url, timeout=120) as client:
            # The first request creates the labelled series; rate() sees only increases between
            # samples, so the five measured ones come after a scrape of those series.
            assert client.post("/generate", json={"steps": 4}).status_code == 200
            start = time.time()
            prom.wait_scraped(after=start)
            for seed in range(5):
                response = client.post("/generate", json={"steps": 4, "seed": seed})
                assert response.status_code == 200, response.text
        prom.wait_scraped(after=time.time())
        assert float(query(prom.url, "sum(skipdit_requests_total)")[0]["value"][1]) == 6
        end = time.time()
        out = tmp_path / "dashboard.png"
        counts = render(
            prom.url, start, end, out, rate_interval="10s", step=1, marks=[(start, "5 requests")]
        )
    print(counts)
    assert out.stat().st_size > 50_000
    for title, n in EXERCISED.items():
        assert counts[title] >= n, (title, counts)
    assert counts["Errors by reason"] == 0  # nothing failed


async def _ready(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        await wait_ready(client)
