"""Load test with a report: the service under stepped offered load, then a check that no
accepted job was lost or ran twice.

Starts the service (``loadtest.stack``: embedded, or ``--workers N`` Redis workers), measures
the isolated latency of one request (median of 5; the SLO is ``--slo-factor`` x that), then runs
``loadtest/locustfile.py`` headless for ``--duration`` seconds at each ``--users`` level (each
user starts a request every ``--pacing`` seconds: offered load = users / pacing). After each
level it waits for every accepted job to end and reads each one's record and event stream:

- lost: an accepted job that is unknown or never ends;
- duplicated: a job with more than one start or terminal event, or an Idempotency-Key resubmit
  that named a different job.

Writes ``report.md``, ``results.json``, ``latency_vs_load.png`` and ``throughput_vs_load.png``
into ``--out``; exits 1 if any job was lost or duplicated. With ``--prometheus``, a private
Prometheus (``loadtest/prometheus.py``) scrapes every /metrics endpoint of the stack each second
for the whole run, and ``dashboard.png`` is the Grafana dashboard over the load levels, drawn from
it by ``loadtest/render_dashboard.py``.

    python -m loadtest.run --users 1 2 4 8 --duration 60 --prometheus --out docs/load
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from loadtest import prometheus
from loadtest.render_dashboard import DASHBOARD, render
from loadtest.stack import Stack, add_aof_option, wait_ready

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
GENERATIONS = ("sync", "sse", "poll")  # the kinds whose latency and goodput count
TERMINAL = {"done", "failed", "cancelled", "expired"}


@dataclass
class Level:
    users: int
    offered_per_s: float  # requests started a second (users / pacing)
    seconds: float
    completed: int  # generation jobs done
    throughput_per_s: float
    p50_s: float | None
    p95_s: float | None
    p99_s: float | None
    goodput: float  # share of generation requests done within the SLO
    rejected: float  # share of generation requests answered 429
    http_requests: int
    http_errors: int  # unexpected HTTP outcomes (locust failures)
    error_rate: float
    accepted: int  # jobs the service accepted (all kinds)
    lost: int
    duplicated: int


async def isolated_latency(url: str, steps: int, repeats: int = 5) -> float:
    """Median seconds of one uncached sync request with nothing else running."""
    body = {"class_label": 3, "steps": steps, "seed": 0}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        await wait_ready(client)
        (await client.post("/generate", json=body)).raise_for_status()  # warm-up
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            (await client.post("/generate", json=body)).raise_for_status()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def run_locust(url: str, users: int, args: argparse.Namespace, ledger: Path, prefix: Path) -> None:
    env = os.environ | {
        "SKIPDIT_LOAD_LEDGER": str(ledger),
        "SKIPDIT_LOAD_PACING": str(args.pacing),
        "SKIPDIT_LOAD_STEPS": str(args.steps),
    }
    locust = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    argv = [locust, "-f", str(LOCUSTFILE), "--host", url, "--headless", "-u", str(users),
            "-r", str(users), "-t", f"{args.duration}s", "--stop-timeout", "120",
            "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING"]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1):  # 1: some requests failed, which the report counts
        raise RuntimeError(f"locust exited {done.returncode}: {done.stderr[-2000:]}")


async def audit(client: httpx.AsyncClient, entries: list[dict]) -> tuple[int, int]:
    """(lost, duplicated) among the accepted jobs of a level, once each has ended."""
    ids = {e["job_id"] for e in entries if e["job_id"]}
    lost = 0
    duplicated = sum(1 for e in entries if e.get("resubmitted_id") not in (None, e["job_id"]))
    for job_id in sorted(ids):
        status = await _final_status(client, job_id)
        if status not in TERMINAL:
            lost += 1
            continue
        text = (await client.get(f"/jobs/{job_id}/events")).text
        kinds = [json.loads(ln[6:])["type"] for ln in text.splitlines() if ln.startswith("data:")]
        if kinds.count("started") > 1 or sum(k in TERMINAL for k in kinds) != 1:
            duplicated += 1
    return lost, duplicated


async def audit_url(url: str, entries: list[dict]) -> tuple[int, int]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        return await audit(client, entries)


async def _final_status(client: httpx.AsyncClient, job_id: str, timeout: float = 300) -> str:
    """The job's terminal status; 'unknown' (404) or 'stuck' (never ended) otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get(f"/jobs/{job_id}")
        if r.status_code == 404:
            return "unknown"
        status = r.json()["status"]
        if status in TERMINAL:
            return status
        await asyncio.sleep(0.2)
    return "stuck"


def http_counts(prefix: Path) -> tuple[int, int]:
    """(requests, failures) over locust's HTTP rows (not the JOB samples, not the total); an
    exception inside a user's task (the load test's own bug) counts as a failure too."""
    with Path(f"{prefix}_stats.csv").open() as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if r["Type"] not in ("JOB", "") and r["Name"] != "Aggregated"
        ]
    with Path(f"{prefix}_exceptions.csv").open() as f:
        crashed = sum(int(r["Count"]) for r in csv.DictReader(f))
    failures = sum(int(r["Failure Count"]) for r in rows) + crashed
    return sum(int(r["Request Count"]) for r in rows), failures


def level_figures(users: int, args: argparse.Namespace, entries: list[dict], slo: float,
                  prefix: Path, lost: int, duplicated: int) -> Level:  # fmt: skip
    generations = [e for e in entries if e["kind"] in GENERATIONS]
    done = [e["seconds"] for e in generations if e["status"] == "done"]
    pct = (lambda q: float(np.percentile(done, q))) if done else (lambda q: None)
    requests, failures = http_counts(prefix)
    n = max(1, len(generations))
    return Level(
        users=users,
        offered_per_s=users / args.pacing,
        seconds=args.duration,
        completed=len(done),
        throughput_per_s=len(done) / args.duration,
        p50_s=pct(50),
        p95_s=pct(95),
        p99_s=pct(99),
        goodput=sum(s <= slo for s in done) / n,
        rejected=sum(e["status"] == "rejected" for e in generations) / n,
        http_requests=requests,
        http_errors=failures,
        error_rate=failures / max(1, requests),
        accepted=sum(1 for e in entries if e["job_id"]),
        lost=lost,
        duplicated=duplicated,
    )


def run(args: argparse.Namespace) -> tuple[float, list[Level], str | None]:
    """(isolated latency, levels, the Prometheus version that drew dashboard.png or None)."""
    out = args.out
    work = out / "raw"
    work.mkdir(parents=True, exist_ok=True)
    env = {"SKIPDIT_MODEL": args.model} if args.model else {}
    levels, marks = [], []
    with (
        Stack(workers=args.workers, env=env, log_dir=work, aof=args.aof) as stack,
        scraping(args, stack, work) as prom,
    ):
        isolated = asyncio.run(isolated_latency(stack.url, args.steps))
        slo = args.slo_factor * isolated
        print(f"isolated latency {isolated * 1e3:.0f} ms; SLO {slo * 1e3:.0f} ms", flush=True)
        for users in args.users:
            marks.append((time.time(), f"{users} users"))
            ledger = work / f"ledger_u{users}.jsonl"
            ledger.unlink(missing_ok=True)
            run_locust(stack.url, users, args, ledger, work / f"u{users}")
            entries = (
                [json.loads(ln) for ln in ledger.read_text().splitlines()]
                if ledger.exists()
                else []
            )
            lost, duplicated = asyncio.run(audit_url(stack.url, entries))
            level = level_figures(users, args, entries, slo, work / f"u{users}", lost, duplicated)
            levels.append(level)
            print(f"users {users}: {level.throughput_per_s:.2f} jobs/s, p95 {level.p95_s}, "
                  f"goodput {level.goodput:.0%}, errors {level.http_errors}, lost {lost}, "
                  f"duplicated {duplicated}", flush=True)  # fmt: skip
        drawn_by = draw_dashboard(prom, marks, out / "dashboard.png") if prom else None
    return isolated, levels, drawn_by


def scraping(
    args: argparse.Namespace, stack: Stack, work: Path
) -> contextlib.AbstractContextManager[prometheus.Prometheus | None]:
    """With ``--prometheus``: a private Prometheus scraping the stack's /metrics endpoints."""
    if not args.prometheus:
        return contextlib.nullcontext()
    return prometheus.Prometheus(stack.metrics_targets, log=work / "prometheus.log")


def draw_dashboard(prom: prometheus.Prometheus, marks: list[tuple[float, str]], out: Path) -> str:
    """The dashboard from the first level's start to a scrape after the last level's end, each
    level marked; returns the Prometheus version."""
    prom.wait_scraped(after=time.time())
    counts = render(prom.url, marks[0][0], time.time(), out, marks=marks)
    print(f"{out}: series per panel {counts}", flush=True)
    return prometheus.version(prom.url)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(args: argparse.Namespace, isolated: float, levels: list[Level], command: str,
           drawn_by: str | None = None) -> None:  # fmt: skip
    """report.md, results.json and the plots; ``drawn_by``: the Prometheus version behind
    dashboard.png, if one was drawn."""
    out = args.out
    slo = args.slo_factor * isolated
    deployment = (
        f"API + {args.workers} Redis worker(s), Redis AOF {args.aof}"
        if args.workers
        else "embedded (one process)"
    )
    lines = [
        "# Load test\n",
        f"`{command}` on this machine (2 CPU cores), {deployment}, model "
        f"{args.model or 'default'}, {args.steps} DDIM steps a request, each user starting a "
        f"request every {args.pacing:g} s for {args.duration} s per level; mix: sync 4, SSE 2, "
        f"polling 2, cancel 1, invalid 1 (`loadtest/locustfile.py`).\n",
        f"Isolated single-request latency {isolated * 1e3:.0f} ms; SLO = {args.slo_factor:g}x = "
        f"{slo * 1e3:.0f} ms. Latency is end to end (submit to result) over the sync, SSE and "
        f"polling requests that finished; goodput is the share of them (429s and errors "
        f"included) done within the SLO.\n",
        "| users | offered req/s | done jobs/s | p50 s | p95 s | p99 s | goodput | 429 | "
        "HTTP errors | accepted | lost | duplicated |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in levels:
        lines.append(
            f"| {v.users} | {v.offered_per_s:.1f} | {v.throughput_per_s:.2f} | {_s(v.p50_s)} | "
            f"{_s(v.p95_s)} | {_s(v.p99_s)} | {v.goodput:.0%} | {v.rejected:.0%} | "
            f"{v.http_errors}/{v.http_requests} ({v.error_rate:.1%}) | {v.accepted} | {v.lost} | "
            f"{v.duplicated} |"
        )
    lost, dup = sum(v.lost for v in levels), sum(v.duplicated for v in levels)
    accepted = sum(v.accepted for v in levels)
    lines.append(f"\nLost jobs: {lost}; duplicated jobs: {dup} (of {accepted} accepted).")
    if drawn_by is not None:
        dashboard = DASHBOARD.relative_to(DASHBOARD.parents[3])
        lines.append(
            f"\n![dashboard](dashboard.png)\n\ndashboard.png: {dashboard}'s queries evaluated by "
            f"a real Prometheus ({drawn_by}) that scraped this run every "
            f"{prometheus.SCRAPE_INTERVAL_S} s, drawn by loadtest/render_dashboard.py (no Grafana "
            f"here); dashed lines mark where each level began."
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    summary = {"command": command, "isolated_s": isolated, "slo_s": slo}
    summary["levels"] = [asdict(v) for v in levels]
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    plots(out, levels, slo)


def plots(out: Path, levels: list[Level], slo: float) -> None:
    """latency_vs_load.png and throughput_vs_load.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offered = [v.offered_per_s for v in levels]
    latency = {q[:3]: [getattr(v, q) for v in levels] for q in ("p50_s", "p95_s", "p99_s")}
    _line_plot(plt, out / "latency_vs_load.png", offered, latency, "end-to-end latency (s)", slo)
    jobs = {
        "done jobs/s": [v.throughput_per_s for v in levels],
        "within-SLO jobs/s (generation share 80%)": [
            v.goodput * v.offered_per_s * 0.8 for v in levels
        ],
    }
    _line_plot(plt, out / "throughput_vs_load.png", offered, jobs, "jobs/s")


def _line_plot(
    plt: Any,
    path: Path,
    x: list[float],
    lines: dict[str, list],
    ylabel: str,
    slo: float | None = None,
) -> None:
    """One PNG: each named line against offered load (and the SLO as a dashed line)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, ys in lines.items():
        ax.plot(x, ys, marker="o", label=label)
    if slo is not None:
        ax.axhline(slo, color="grey", linestyle="--", label="SLO")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--duration", type=int, default=60, help="seconds per level")
    p.add_argument("--pacing", type=float, default=1.0, help="seconds between a user's requests")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--workers", type=int, default=0, help="0: embedded; N: Redis + N workers")
    add_aof_option(p)
    p.add_argument("--model", default=None)
    p.add_argument("--slo-factor", type=float, default=3.0)
    p.add_argument("--out", type=Path, default=Path("docs/load"))
    p.add_argument(
        "--prometheus", action="store_true", help="scrape with Prometheus, draw dashboard.png"
    )
    args = p.parse_args(argv)
    command = "python -m loadtest.run " + " ".join(sys.argv[1:] if argv is None else argv)
    isolated, levels, drawn_by = run(args)
    report(args, isolated, levels, command, drawn_by)
    bad = sum(v.lost + v.duplicated for v in levels)
    print(f"wrote {args.out / 'report.md'}; lost + duplicated: {bad}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
