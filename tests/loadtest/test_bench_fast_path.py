"""The fast-path benchmark script, run as a user runs it, on the smallest preset on a CPU
(Triton in its interpreter): every table gets its rows and the numbers are sane."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the benchmark script end to end

ROOT = Path(__file__).resolve().parents[2]


STEP_ROWS = ("eager (torch, off)", "kernels (triton, off)")


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_step_costs_cache_speedups_and_engine_rates_are_reported(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench_fast_path", "--preset", "digits-tiny",
         "--device", "cpu", "--dtype", "float32", "--rows", "2", "--steps", "6", "--timed", "2",
         "--repeats", "1", "--paths", "eager", "kernels", "--vanilla", "skip",
         "--concurrency", "2", "--total", "3", "--engine-path", "kernels", "--skip", "diffusers",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=os.environ | {"TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (tmp_path / "fast_path.md").read_text().splitlines()
    table = [cells(line) for line in lines if line.startswith("| ")]
    eager, kernels = (next(r[1:] for r in table if r[0] == name) for name in STEP_ROWS)
    assert sum(r[0] == "eager (torch, off)" for r in table) == 2  # step table, engine table
    assert float(eager[0]) > 0 and float(eager[1]) > 0 and float(kernels[0]) > 0
    for share in eager[4:7]:  # "1.09x / 1.20x = 91%": wall speedup, FLOP ratio, their quotient
        wall, bound = (float(v.rstrip("x")) for v in share.split(" = ")[0].split(" / "))
        assert bound > 1.0 and wall > 0 and share.endswith("%")
    assert kernels[4:7] == ["-", "-", "-"]  # only eager and both loop
    engine = [line for line in lines if line.startswith("| kernels") and "img" not in line][-1]
    assert all(float(v) > 0 for v in cells(engine)[2:5])
