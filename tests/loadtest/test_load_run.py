"""The load test at a small bounded size, as a user runs it: API + a Redis worker in their own
processes, locust headless, the report written and no job lost or run twice (else exit 1).
And the audit on its own: it does count a lost job and a resubmit that made a second job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.run import audit
from model import registry
from tests.service.helpers import running_app, settings_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.redis  # loadtest.run starts its own redis-server and worker
@pytest.mark.slow
def test_a_small_load_run_writes_its_report_and_loses_nothing(tmp_path: Path) -> None:
    out = tmp_path / "load"
    argv = [sys.executable, "-m", "loadtest.run", "--users", "2", "--duration", "6", "--steps",
            "6", "--workers", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((out / "results.json").read_text())
    (level,) = results["levels"]
    assert level["lost"] == 0 and level["duplicated"] == 0 and level["accepted"] > 0
    assert level["completed"] > 0 and level["p95_s"] >= level["p50_s"] > 0
    assert level["http_errors"] == 0 and 0 <= level["goodput"] <= 1
    assert results["slo_s"] == pytest.approx(3 * results["isolated_s"])
    report = (out / "report.md").read_text()
    assert "| 2 | 2.0 |" in report and "Lost jobs: 0; duplicated jobs: 0" in report
    assert "Redis AOF always" in report  # the private Redis runs as deploy/ runs it
    for plot in ("latency_vs_load.png", "throughput_vs_load.png"):
        assert (out / plot).stat().st_size > 0


async def test_the_audit_counts_lost_and_duplicated_jobs() -> None:
    shipped = Path(registry.default_model())  # a name, as SKIPDIT_MODEL takes it
    async with running_app(settings_for("memory", shipped, None)) as client:
        real = (await client.post("/generate", json={"steps": 2})).json()["id"]
        entries = [{"job_id": real, "kind": "sync", "status": "done"}]
        assert await audit(client, entries) == (0, 0)
        gone = {"job_id": "0" * 32, "kind": "poll", "status": "timeout"}
        twice = {"job_id": real, "kind": "sse", "status": "done", "resubmitted_id": "f" * 32}
        assert await audit(client, [*entries, gone, twice]) == (1, 1)
