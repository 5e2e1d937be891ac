"""Settings refuse to boot on values that cannot run, naming the setting; the served models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from model import registry
from service.cli import main
from service.settings import (
    SHIPPED_TEXT,
    SHIPPED_TEXT_VIDEO,
    SHIPPED_VIDEO,
    Settings,
    default_models,
)

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


@pytest.mark.slow
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


def test_models_come_comma_separated_or_as_json_and_default_to_the_shipped_ones(
    monkeypatch: pytest.MonkeyPatch, tiny_model_dir: Path
) -> None:
    # the image model first
    shipped = [registry.default_model(), SHIPPED_VIDEO, SHIPPED_TEXT, SHIPPED_TEXT_VIDEO]
    assert Settings().models == default_models() == shipped
    monkeypatch.setenv("SKIPDIT_MODELS", f" digits-dit , {tiny_model_dir}")
    assert Settings().models == ["digits-dit", str(tiny_model_dir)]
    monkeypatch.setenv("SKIPDIT_MODELS", f'["{tiny_model_dir}", "digits-dit"]')
    assert Settings().models == [str(tiny_model_dir), "digits-dit"]
    monkeypatch.delenv("SKIPDIT_MODELS")
    monkeypatch.setenv("SKIPDIT_MODEL", "digits-dit")  # the single-model form still works
    assert Settings().models == ["digits-dit"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SKIPDIT_MODELS": "digits-dit,nope"}, r"SKIPDIT_MODELS: unknown model 'nope'; known: \["),
        ({"SKIPDIT_MODEL": "nope"}, "SKIPDIT_MODEL: unknown model 'nope'"),
        ({"SKIPDIT_MODELS": "digits-dit,digits-dit"}, "SKIPDIT_MODELS names .* more than once"),
        ({"SKIPDIT_MODELS": "[]"}, "SKIPDIT_MODELS is empty"),
        (
            {"SKIPDIT_MODELS": "digits-dit", "SKIPDIT_MODEL": "digits-skip-dit"},
            "SKIPDIT_MODEL .* and SKIPDIT_MODELS .* are both set",
        ),
    ],
)
def test_inconsistent_models_stop_the_boot_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_the_same_model_in_both_forms_is_consistent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKIPDIT_MODELS", "digits-dit")
    monkeypatch.setenv("SKIPDIT_MODEL", "digits-dit")
    assert Settings().models == ["digits-dit"]
    assert Settings(models=["digits-skip-dit", "digits-dit"], model=None).models[0] == (
        "digits-skip-dit"  # explicit values (the CLI's --model) replace the environment's
    )


def test_repeated_model_flags_are_the_served_list_and_an_unknown_one_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--model", "digits-dit", "--model", "nope"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("skipdit serve: error: SKIPDIT_MODELS: unknown model 'nope'; known:")


def test_the_prompt_cache_size_comes_from_the_environment_and_is_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().prompt_cache_entries == 1024
    monkeypatch.setenv("SKIPDIT_PROMPT_CACHE_ENTRIES", "5")
    assert Settings().prompt_cache_entries == 5
    monkeypatch.setenv("SKIPDIT_PROMPT_CACHE_ENTRIES", "-1")
    with pytest.raises(ValidationError, match="prompt_cache_entries"):
        Settings()
