"""Settings refuse to boot on values that cannot run, naming the setting."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError

from service.settings import Settings

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only machine")


@NO_CUDA
def test_triton_kernels_without_a_gpu_stop_the_boot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValidationError, match="SKIPDIT_KERNELS=triton cannot run"):
        Settings(kernels="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs them (tests, slowly)
    assert Settings(kernels="triton").kernels == "triton"


@NO_CUDA
def test_cuda_graphs_without_a_gpu_stop_the_boot() -> None:
    with pytest.raises(ValidationError, match="SKIPDIT_GRAPHS=cuda_graphs needs a CUDA device"):
        Settings(graphs="cuda_graphs")
    assert Settings().kernels == "auto" and Settings().graphs == "auto"


def test_a_bad_device_names_the_setting() -> None:
    with pytest.raises(ValidationError, match="SKIPDIT_DEVICE"):
        Settings(device="gpu-please")


@NO_CUDA
def test_serve_with_an_impossible_fast_path_exits_2_in_one_line() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env | {"SKIPDIT_KERNELS": "triton"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "skipdit serve: error: SKIPDIT_KERNELS=triton cannot run: Triton kernels need a CUDA "
        "device (or TRITON_INTERPRET=1 on a CPU), got cpu"
    ]
