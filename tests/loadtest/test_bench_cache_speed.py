"""The cache-speed benchmark script, run as a user runs it, on the smallest preset."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark script end to end

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_gets_a_row_and_caching_cuts_counted_flops() -> None:
    out = subprocess.run(
        [sys.executable, "loadtest/bench_cache_speed.py", "--preset", "digits-tiny",
         "--device", "cpu", "--dtype", "float32", "--steps", "8", "--requests", "2",
         "--repeats", "1", "--intervals", "2", "4", "--thresholds", "0.1"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=240,
    ).stdout  # fmt: skip
    rows = {
        cells[0]: cells[1:]
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| setting")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    assert list(rows) == [
        "none", "skip_cache N=2", "skip_cache N=4", "fora N=2", "fora N=4", "delta_dit N=2",
        "delta_dit N=4", "toca N=2 r=0.25", "toca N=4 r=0.25", "fbcache th=0.1",
        "teacache th=0.02", "teacache th=0.03", "teacache th=0.05", "skip_cache N=4 th=0.02",
        "skip_cache N=4 th=0.05", "skip_cache N=4 th=0.1",
    ]  # fmt: skip
    assert rows["none"][1:] == ["1.00x", "1.00x", "0%"]
    for label in ("skip_cache N=2", "skip_cache N=4", "fora N=4"):
        flop_ratio, cached = float(rows[label][2].rstrip("x")), rows[label][3]
        assert flop_ratio > 1.0 and cached != "0%", (label, rows[label])
    # A longer interval caches more steps and so counts fewer FLOPs.
    assert float(rows["skip_cache N=4"][2].rstrip("x")) > float(rows["skip_cache N=2"][2][:-1])
