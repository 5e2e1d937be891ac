"""Latency through HTTP + Redis vs the direct pipeline call, and images/s at concurrency.

Starts its own redis-server (free port), ``skipdit serve`` (API only) and one ``skipdit worker``,
all on 127.0.0.1, then measures in one run:
- the latency of a single request through HTTP -> Redis -> worker against the same request
  through ``Pipeline.generate`` in this process, run in interleaved pairs (the median of the
  pairs' ratios), with the worker's own engine time beside it;
- images/s at concurrency 1, 4 and 16 (each client sends requests back to back).

``--floor`` adds the same pairs with the direct call run in a second process in place of the
service: the ratio a service with no overhead at all would show on this machine. Two processes
running the same call differ here by a few percent that stays with the process, so single ratios
mean little below that floor's spread.

    python -m loadtest.bench_service [--model NAME] [--steps 50] [--requests 32] [--floor]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import httpx

from loadtest.stack import Stack, add_aof_option, wait_ready
from model import registry
from service.request import GenerateParams, resolve

PHASES = {
    "in": "the API takes the request",
    "queue": "queued and started",
    "worker": "in the worker around the engine (events, encoding, storing)",
    "out": "the result back to the client",
}


async def one_timed(client: httpx.AsyncClient, body: dict) -> tuple[float, float, list[float]]:
    """Seconds of one synchronous request, of it in the worker's engine, and of each of its
    ``PHASES`` besides (from the job record's times: one machine, one clock)."""
    sent, began = time.time(), time.perf_counter()
    response = await client.post("/generate", json=body)
    seconds, received = time.perf_counter() - began, time.time()
    response.raise_for_status()
    job = response.json()
    engine = job["result"]["seconds_engine"]
    created, started, finished = job["created_at"], job["started_at"], job["finished_at"]
    phases = [created - sent, started - created, finished - started - engine, received - finished]
    return seconds, engine, phases


async def one(client: httpx.AsyncClient, body: dict) -> float:
    return (await one_timed(client, body))[0]


async def throughput(client: httpx.AsyncClient, body: dict, concurrency: int, total: int) -> float:
    sent = 0

    async def loop() -> int:
        nonlocal sent
        images = 0
        while sent < total:
            sent += 1
            await one(client, body | {"seed": sent})
            images += body["num_images"]
        return images

    began = time.perf_counter()
    images = sum(await asyncio.gather(*(loop() for _ in range(concurrency))))
    return images / (time.perf_counter() - began)


def direct_process(conn: Connection, model: str | None, body: dict) -> None:
    """A second process that runs the direct call whenever it is asked (the noise floor)."""
    loaded = registry.load(model)
    params = resolve(GenerateParams(**body), loaded.info)
    loaded.pipeline.generate([params])  # warm-up
    conn.send(None)
    while conn.recv():
        conn.send(loaded.pipeline.generate([params])[0].seconds)


def floor(args: argparse.Namespace, body: dict, direct: Callable[[], float]) -> float:
    """The median ratio of the same direct call in a second process to this one's, in as
    many interleaved pairs as the service had."""
    spawn = multiprocessing.get_context("spawn")
    ours, theirs = spawn.Pipe()
    other = spawn.Process(target=direct_process, args=(theirs, args.model, body))
    other.start()
    try:
        ours.recv()
        ratios = []
        for _ in range(args.repeats):
            here = direct()
            ours.send(True)
            ratios.append(ours.recv() / here)
        ours.send(False)
    finally:
        other.join(60)
    return statistics.median(ratios)


async def measure(args: argparse.Namespace, base_url: str) -> None:
    body = {"steps": args.steps, "num_images": 1, "cache_interval": args.cache_interval, "seed": 0}
    loaded = registry.load(args.model)
    params = resolve(GenerateParams(**body), loaded.info)

    def direct_call() -> float:
        return loaded.pipeline.generate([params])[0].seconds

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        # Time the direct call only once the worker has loaded and warmed up its model: on a
        # small machine its start-up would otherwise share the cores with the direct runs.
        await wait_ready(client)
        await one(client, body)  # warm-up
        direct_call()  # warm-up
        # Interleaved pairs (direct, then served): drift of a shared machine hits both sides.
        direct, served, engine, phases = [], [], [], []
        for _ in range(args.repeats):
            direct.append(direct_call())
            seconds, in_engine, parts = await one_timed(client, body)
            served.append(seconds)
            engine.append(in_engine)
            phases.append(parts)
        noise = None
        if args.floor:
            noise = floor(args, body, direct_call)
        rates = {c: await throughput(client, body, c, args.requests) for c in (1, 4, 16)}
    d, s, e = (statistics.median(v) for v in (direct, served, engine))
    ratio = statistics.median(b / a for a, b in zip(direct, served, strict=True))
    print(f"model {loaded.name}, {args.steps} DDIM steps, cache_interval {args.cache_interval}")
    print(f"single request: direct pipeline {d * 1e3:.1f} ms, HTTP+Redis+worker {s * 1e3:.1f} ms,"
          f" ratio {ratio:.2f}x (median of {args.repeats} interleaved pairs' ratios)")  # fmt: skip
    print(f"  of which in the worker's engine {e * 1e3:.1f} ms (admission to result), and"
          f" (medians):")  # fmt: skip
    for i, what in enumerate(PHASES.values()):
        print(f"    {statistics.median(p[i] for p in phases) * 1e3:5.1f} ms {what}")
    print(f"  spread: direct {min(direct) * 1e3:.1f}-{max(direct) * 1e3:.1f} ms,"
          f" served {min(served) * 1e3:.1f}-{max(served) * 1e3:.1f} ms")  # fmt: skip
    if noise is not None:
        print(f"  floor: the direct call in a second process, {noise:.2f}x (median of"
              f" {args.repeats} pairs' ratios): what no overhead at all would show")  # fmt: skip
    for c, rate in rates.items():
        print(f"concurrency {c:>2}: {rate:.2f} images/s ({args.requests} requests)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cache-interval", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--floor", action="store_true", help="also measure the noise floor")
    add_aof_option(p)
    args = p.parse_args()
    env = {"SKIPDIT_MODEL": args.model} if args.model else {}
    with Stack(workers=1, env=env, aof=args.aof) as stack:
        asyncio.run(measure(args, stack.url))


if __name__ == "__main__":
    main()
