"""Deployment files parse and agree with the code (no docker engine here to build them)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from service.queue.keys import Keys
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_compose_services_use_real_commands_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["api"]["command"][:2] == ["skipdit", "serve"]
    assert services["worker"]["command"] == ["skipdit", "worker"]
    for name in ("api", "worker"):
        env = {
            k.removeprefix("SKIPDIT_").lower(): v for k, v in services[name]["environment"].items()
        }
        Settings(**env)  # every variable is a known, valid setting
    assert (ROOT / services["prometheus"]["volumes"][0].split(":")[0]).is_file()


def test_k8s_manifests_use_known_settings_and_the_stream_keys() -> None:
    docs = list(yaml.safe_load_all((ROOT / "deploy/k8s/skipdit.yaml").read_text()))
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    settings = Settings(**{k.removeprefix("SKIPDIT_").lower(): v for k, v in config.items()})
    triggers = next(d for d in docs if d["kind"] == "ScaledObject")["spec"]["triggers"]
    scalers = [t["metadata"] for t in triggers]
    # One trigger per served model's stream, on the workers' consumer group.
    assert sorted(s["stream"] for s in scalers) == sorted(map(Keys().stream, settings.models))
    assert {s["consumerGroup"] for s in scalers} == {Keys().group}


def test_dockerfile_copies_every_package_and_runs_the_cli() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for package in ("model", "kernels", "service"):
        assert f"COPY {package} ./{package}" in text
    assert "torch==2.13.0" in text and 'CMD ["skipdit", "serve"' in text


def test_locustfile_is_valid_python_posting_generate() -> None:
    source = (ROOT / "loadtest/locustfile.py").read_text()
    ast.parse(source)
    assert '"/generate"' in source
