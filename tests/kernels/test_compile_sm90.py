"""Both kernels compile for Hopper (sm_90) through Triton's own compiler on this CPU (no GPU:
``loadtest/compile_sm90.py``), every autotune config of each dtype, and none spills registers.
And each launch autotunes over its own dtype's configs only (``dispatch.autotune_by_dtype``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import attention, dispatch, lsc_fusion

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_config_compiles_for_sm90_without_spilling() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.compile_sm90", "--dtypes", "fp32", "bf16"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    rows = re.findall(r"^\| (lsc|attention) \| (\w+) \| (\([\d, ]+\)) \| (.*)$", run.stdout, re.M)
    per_kernel = {
        "lsc": sum(len(c) for c in lsc_fusion.CUDA_CONFIGS.values()),
        "attention": sum(len(c) for c in attention.CUDA_CONFIGS.values()),
    }
    for kernel, n in per_kernel.items():
        assert sum(r[0] == kernel for r in rows) == n, run.stdout  # each dtype its family's
    for kernel, dtype, config, rest in rows:
        registers, stack = (int(v) for v in rest.split(" | ")[:2])  # a failure is no number
        assert stack == 0 and registers <= 255, (kernel, dtype, config, rest)


class _Config:  # what the pruning reads of a triton.Config: only its identity
    pass


def test_a_launch_tries_only_its_dtypes_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SKIPDIT_KERNEL_TUNING")  # tests/conftest.py sets quick tuning
    fp32, half = [_Config(), _Config()], [_Config(), _Config(), _Config()]
    tuning = dispatch.autotune_by_dtype(sys.modules[__name__], {"fp32": fp32, "16-bit": half}, "x")
    prune = tuning["prune_configs_by"]["early_config_prune"]
    configs = tuning["configs"]
    assert configs == fp32 + half
    assert prune(configs, {"x": torch.zeros(1)}) == fp32
    assert prune(configs, {"x": torch.zeros(1, dtype=torch.bfloat16)}) == half
    monkeypatch.setenv("SKIPDIT_KERNEL_TUNING", "quick")
    quick = dispatch.autotune_by_dtype(sys.modules[__name__], {"fp32": fp32, "16-bit": half}, "x")
    assert quick["configs"] == [fp32[0], half[0]]
    assert quick["prune_configs_by"]["early_config_prune"](
        quick["configs"], {"x": torch.ones(2)}
    ) == [fp32[0]]
