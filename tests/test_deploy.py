"""Deployment files parse and agree with the code and with each other. No docker engine or cluster
runs here: .ci/deploy-checks runs docker-compose, hadolint and kubernetes-validate on the files;
these tests check what those tools cannot (KEDA's CRD, PromQL, the dashboard, the settings)."""

from __future__ import annotations

import ast
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

from service.messages import JobStatus
from service.metrics import Metrics
from service.queue.keys import Keys
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy/k8s/skipdit.yaml"
K8S_REDIS_CLUSTER = ROOT / "deploy/k8s/redis-cluster.yaml"  # applied after K8S
PROMETHEUS = ROOT / "deploy/prometheus/prometheus.yml"
GRAFANA = ROOT / "deploy/grafana"
DASHBOARD = GRAFANA / "dashboards/skipdit.json"

# Series that deploy files use before service/metrics.py exports them, each with what it needs.
NOT_EXPORTED_YET: dict[str, str] = {}
# Grafana's own variables, as a query sees them once Grafana fills them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m"}


# ----------------------------------------------------------------------------- helpers


def _settings(env: dict[str, str]) -> Settings:
    """The settings a process with these SKIPDIT_ variables boots with (raises if invalid)."""
    return Settings(**{k.removeprefix("SKIPDIT_").lower(): v for k, v in env.items()})


def _flag(args: list[str], name: str) -> str:
    """The value after ``name`` in a command line."""
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _k8s(*then: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -f K8S -f <then>...`` leaves: a later file's object replaces
    the one of the same kind, namespace and name."""
    objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
    for path in (K8S, *then):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                meta = doc["metadata"]
                objects[doc["kind"], meta.get("namespace"), meta["name"]] = doc
    return list(objects.values())


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def _container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """ConfigMaps the container takes whole, then its literal env entries (they win)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env |= _one(docs, "ConfigMap", source["configMapRef"]["name"])["data"]
    env |= {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return env


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", "", (ROOT / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def _exported() -> dict[str, str]:
    """Every series name service/metrics.py exposes -> its metric family, read off its registry."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
    }
    return {
        family.name + suffix: family.name
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def _selectors(expr: str) -> Iterator[Any]:
    """Every vector selector of a PromQL expression (raises ValueError on bad syntax)."""
    promql = pytest.importorskip("promql_parser", reason="installed by .ci/deploy-checks")
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    found: list[Any] = []
    promql.walk(
        promql.parse(expr),
        lambda node: found.append(node) if isinstance(node, promql.VectorSelector) else None,
    )
    yield from found


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or a folder above it decides."""

    def rx(pattern: str) -> re.Pattern[str]:
        out = ""
        for token in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]", pattern):
            out += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                token, re.escape(token)
            )
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        regex = rx(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


# ----------------------------------------------------------------------------- image


def test_dockerfile_builds_a_venv_and_runs_the_cli_as_non_root() -> None:
    steps = _dockerfile()
    stages = [args for op, args in steps if op == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS builder"), stages
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert all(s.startswith("${BASE_IMAGE}") for s in stages)  # the venv needs its interpreter
    text = (ROOT / "Dockerfile").read_text()
    assert 'pip install --index-url "$TORCH_INDEX" torch==2.13.0' in text
    for package in ("model", "kernels", "service"):
        assert f"COPY {package} ./{package}" in text

    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    instructions = dict(final)  # the last of each kind
    assert instructions["COPY"] == "--from=builder /opt/venv /opt/venv"
    user = instructions["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert json.loads(instructions["ENTRYPOINT"]) == ["skipdit"]
    assert json.loads(instructions["CMD"]) == ["serve", "--host", "0.0.0.0"]
    check = json.loads(instructions["HEALTHCHECK"].split("CMD", 1)[1])
    assert "/healthz" in check[-1] and "SKIPDIT_PORT" in check[-1]
    assert f"'{Settings.model_fields['port'].default}'" in check[-1]  # the same default port


def test_image_torch_pin_is_the_one_ci_uses_and_meets_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    torch = next(
        r for r in map(Requirement, pyproject["project"]["dependencies"]) if r.name == "torch"
    )
    assert "2.13.0" in torch.specifier
    assert "torch==2.13.0" in (ROOT / ".ci/run").read_text()


def test_dockerignore_keeps_what_the_build_copies() -> None:
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources = [
        src
        for op, args in _dockerfile()
        if op == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert {"pyproject.toml", "README.md", "model", "service", "kernels"} <= set(sources)
    for source in sources:
        files = [ROOT / source] if (ROOT / source).is_file() else (ROOT / source).rglob("*")
        for file in files:
            rel = file.relative_to(ROOT).as_posix()
            if file.is_file() and "__pycache__" not in rel:
                assert not _dockerignored(rel, patterns), f".dockerignore drops {rel}"
    for kept_out in (".git", ".venv/bin/python", "tests/test_deploy.py", "runs/x", "docs/a.md"):
        assert _dockerignored(kept_out, patterns), kept_out
    assert _dockerignored("service/__pycache__/x.pyc", patterns)


def test_package_data_ships_every_model_weight() -> None:
    """The image installs the package (not editable): model/weights reach it as package data."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["model"]
    weights = [f for f in (ROOT / "model/weights").rglob("*") if f.is_file()]
    assert weights
    for file in weights:
        rel = file.relative_to(ROOT / "model")
        assert any(rel.match(g) for g in globs), f"{rel} is not package data: not in the image"


# ----------------------------------------------------------------------------- compose


def test_compose_services_use_real_commands_and_settings() -> None:
    services = _compose()["services"]
    entrypoint = json.loads(dict(_dockerfile())["ENTRYPOINT"])
    assert entrypoint + services["api"]["command"][:1] == ["skipdit", "serve"]
    assert entrypoint + services["worker"]["command"] == ["skipdit", "worker"]
    for name in ("api", "worker"):
        _settings(services[name]["environment"])  # every variable is a known, valid setting


def test_compose_every_service_is_healthchecked_and_started_once_its_needs_are() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        for needed, how in service.get("depends_on", {}).items():
            assert how == {"condition": "service_healthy"}, (name, needed)
            assert "healthcheck" in services[needed], needed
    assert set(services["api"]["depends_on"]) == {"redis"}
    assert set(services["worker"]["depends_on"]) == {"redis"}

    def check(name: str) -> str:
        return " ".join(services[name]["healthcheck"]["test"])

    assert "redis-cli ping" in check("redis")
    api_port = services["api"]["ports"][0].split(":")[-1]
    assert f"localhost:{api_port}/readyz" in check("api")
    worker_port = services["worker"]["environment"]["SKIPDIT_METRICS_PORT"]
    assert f"localhost:{worker_port}/metrics" in check("worker")
    assert "localhost:9090/-/ready" in check("prometheus")
    assert "localhost:3000/api/health" in check("grafana")


def test_compose_worker_stop_grace_outlasts_the_drain() -> None:
    worker = _compose()["services"]["worker"]
    grace = worker["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) > _settings(worker["environment"]).drain_timeout_s


def test_compose_mounts_exist_and_volumes_are_declared() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in compose["volumes"], (name, source)


def _mounted(service: dict[str, Any], repo_path: str) -> str:
    """Where a compose service sees a file or folder of the repository."""
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if (ROOT / source).resolve() == (ROOT / repo_path).resolve():
            return target
    raise AssertionError(f"{repo_path} is not mounted")


def test_prometheus_loads_the_alert_rules_and_scrapes_the_services() -> None:
    services = _compose()["services"]
    config = yaml.safe_load(PROMETHEUS.read_text())
    prometheus = services["prometheus"]
    config_dir = Path(_mounted(prometheus, "deploy/prometheus/prometheus.yml")).parent
    assert config["rule_files"]
    for rule_file in config["rule_files"]:
        repo_file = PROMETHEUS.parent / rule_file
        assert repo_file.is_file(), rule_file
        # ...and inside the container the same name, relative to the config, is that file.
        assert config_dir / rule_file == Path(_mounted(prometheus, str(repo_file)))

    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    api_port = services["api"]["ports"][0].split(":")[-1]
    assert jobs["skipdit-api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    worker = jobs["skipdit-worker"]["dns_sd_configs"][0]
    assert worker["names"] == ["worker"]
    assert str(worker["port"]) == services["worker"]["environment"]["SKIPDIT_METRICS_PORT"]


def test_grafana_is_provisioned_with_prometheus_and_the_dashboards() -> None:
    services = _compose()["services"]
    grafana = services["grafana"]
    provisioning = _mounted(grafana, "deploy/grafana/provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlsplit(source["url"])
    assert source["type"] == "prometheus" and url.hostname in services
    assert f"{url.port}:{url.port}" in services[url.hostname]["ports"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/skipdit.yml").read_text())[
        "providers"
    ]
    assert provider["options"]["path"] == _mounted(grafana, "deploy/grafana/dashboards")

    dashboard = json.loads(DASHBOARD.read_text())
    datasources = [p["datasource"] for p in dashboard["panels"]]
    datasources += [t["datasource"] for p in dashboard["panels"] for t in p["targets"]]
    datasources += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert {d["uid"] for d in datasources} == {source["uid"]}


# ----------------------------------------------------------------------------- Redis persistence


def test_redis_keeps_its_data_with_aof_always_in_compose_and_k8s() -> None:
    redis = _compose()["services"]["redis"]
    for args in (
        redis["command"],
        _pod(_one(_k8s(), "StatefulSet", "redis"))["containers"][0]["args"],
    ):
        assert _flag(args, "--appendonly") == "yes"
        assert _flag(args, "--appendfsync") == "always"
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])  # the image's data dir

    docs = _k8s()
    statefulset = _one(docs, "StatefulSet", "redis")
    (container,) = _pod(statefulset)["containers"]
    assert _flag(container["args"], "--maxmemory-policy") == "noeviction"  # never drop job streams
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    data_dir = _flag(container["args"], "--dir")
    assert any(
        m["mountPath"] == data_dir and m["name"] in claims for m in container["volumeMounts"]
    ), f"{data_dir} is not on a PersistentVolumeClaim"
    headless = _one(docs, "Service", statefulset["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert "redis-cli ping" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert "redis-cli" in container["livenessProbe"]["exec"]["command"]
    # The services reach Redis by that Service's name and port.
    config = _one(docs, "ConfigMap", "skipdit")["data"]
    url = urlsplit(config["SKIPDIT_REDIS_URL"])
    assert url.hostname == headless["metadata"]["name"]
    assert url.port in {p["port"] for p in headless["spec"]["ports"]}


# ----------------------------------------------------------------------------- k8s


def test_k8s_objects_share_one_namespace_and_selectors_match_pod_labels() -> None:
    docs = _k8s()
    namespace = _one(docs, "Namespace")["metadata"]["name"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {namespace}
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    pod_labels = []
    for workload in workloads:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
        pod_labels.append(labels)
    for doc in docs:
        if doc["kind"] in ("Service", "PodDisruptionBudget"):
            selector = doc["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert any(selector.items() <= labels.items() for labels in pod_labels), doc


def test_k8s_containers_have_resources_and_the_api_probes() -> None:
    docs = _k8s()
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        for container in _pod(workload)["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= container["resources"]["requests"].keys(), where
            assert "memory" in container["resources"]["limits"], where

    api = _one(docs, "Deployment", "skipdit-api")
    (container,) = _pod(api)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": _settings(_container_env(docs, container)).port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    budget = _one(docs, "PodDisruptionBudget", "skipdit-api")
    assert budget["spec"]["selector"]["matchLabels"] == api["spec"]["selector"]["matchLabels"]
    assert 0 < budget["spec"]["minAvailable"] < api["spec"]["replicas"]  # drains can proceed


def test_k8s_settings_are_known_and_api_keys_come_from_a_secret() -> None:
    docs = _k8s()
    for name in ("skipdit-api", "skipdit-worker"):
        for container in _pod(_one(docs, "Deployment", name))["containers"]:
            _settings(_container_env(docs, container))  # every variable known and valid
    (api,) = _pod(_one(docs, "Deployment", "skipdit-api"))["containers"]
    keys = next(e for e in api["env"] if e["name"] == "SKIPDIT_API_KEYS")
    assert keys["valueFrom"]["secretKeyRef"]["optional"] is True
    config = _one(docs, "ConfigMap", "skipdit")["data"]
    assert not any("API_KEY" in k for k in config), "keys belong in the Secret"


def test_k8s_worker_drains_before_it_is_killed_and_keda_owns_its_count() -> None:
    docs = _k8s()
    worker = _one(docs, "Deployment", "skipdit-worker")
    (container,) = _pod(worker)["containers"]
    settings = _settings(_container_env(docs, container))
    assert _pod(worker)["terminationGracePeriodSeconds"] > settings.drain_timeout_s
    assert "replicas" not in worker["spec"]  # re-applying must not reset the HPA's count
    assert container["args"] == ["worker"]
    assert (
        f"{settings.metrics_port}"
        == worker["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
    )


# Per Redis: the KEDA trigger type and the trigger fields that say where Redis is.
SCALERS = {
    "redis-streams": lambda host, db: {"address": host, "databaseIndex": db},
    "redis-cluster-streams": lambda host, db: {"addresses": host},  # one database only: 0
}


@pytest.mark.parametrize("then", [(), (K8S_REDIS_CLUSTER,)], ids=["redis", "redis-cluster"])
def test_keda_scales_workers_on_each_model_stream_by_lag_and_pending_entries(
    then: tuple[Path, ...],
) -> None:
    docs = _k8s(*then)
    scaled = _one(docs, "ScaledObject", "skipdit-worker")
    worker = _one(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    (container,) = _pod(worker)["containers"]
    settings = _settings(_container_env(docs, container))
    keys = Keys(settings.redis_prefix)
    redis = urlsplit(settings.redis_url or "")
    namespace = scaled["metadata"]["namespace"]
    triggers = scaled["spec"]["triggers"]
    kind = "redis-cluster-streams" if settings.redis_cluster else "redis-streams"
    assert {t["type"] for t in triggers} == {kind}
    # The KEDA operator dials Redis from its own namespace: the fully qualified Service name.
    where = SCALERS[kind](
        f"{redis.hostname}.{namespace}.svc.cluster.local:{redis.port}",
        redis.path.strip("/") or "0",
    )
    for t in triggers:
        meta = t["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), meta  # the CRD takes strings only
        assert {k: v for k, v in meta.items() if k in where} == where, meta
        assert meta["consumerGroup"] == keys.group

    assert sorted({t["metadata"]["stream"] for t in triggers}) == sorted(
        map(keys.stream, settings.models or [])
    )
    for model in settings.models or []:
        on_stream = [
            t["metadata"] for t in triggers if t["metadata"]["stream"] == keys.stream(model)
        ]
        # KEDA reads one mode per trigger (lagCount wins over pendingEntriesCount): two triggers.
        (lag,) = [m for m in on_stream if "lagCount" in m]
        (pending,) = [m for m in on_stream if "pendingEntriesCount" in m]
        assert "pendingEntriesCount" not in lag and "activationLagCount" in lag
        assert int(lag["lagCount"]) >= 1
        assert int(pending["pendingEntriesCount"]) == settings.max_inflight
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= settings.drain_timeout_s


def test_the_redis_cluster_file_replaces_only_where_redis_is() -> None:
    """redis-cluster.yaml: skipdit.yaml's ConfigMap and worker ScaledObject, changed only where
    Redis is (the URL, the cluster flag, each trigger's type and address fields)."""
    base, cluster = _k8s(), [d for d in yaml.safe_load_all(K8S_REDIS_CLUSTER.read_text()) if d]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in cluster) == [
        ("ConfigMap", "skipdit"), ("ScaledObject", "skipdit-worker"),
    ]  # fmt: skip
    for doc in cluster:
        (same,) = [d for d in base if (d["kind"], d["metadata"]) == (doc["kind"], doc["metadata"])]
        if doc["kind"] == "ConfigMap":
            redis = {"SKIPDIT_REDIS_URL", "SKIPDIT_REDIS_CLUSTER"}
            ours = {k: v for k, v in doc["data"].items() if k not in redis}
            assert ours == {k: v for k, v in same["data"].items() if k not in redis}
            assert _settings(doc["data"]).redis_cluster is True
            continue
        assert doc["spec"] | {"triggers": []} == same["spec"] | {"triggers": []}
        for ours, theirs in zip(doc["spec"]["triggers"], same["spec"]["triggers"], strict=True):
            where = {"type", "address", "addresses", "databaseIndex"}
            assert {k: v for k, v in ours["metadata"].items() if k not in where} == {
                k: v for k, v in theirs["metadata"].items() if k not in where
            }
            assert ours["name"] == theirs["name"]


# ----------------------------------------------------------------------------- alerts, dashboard


def test_alert_rules_are_complete_and_query_exported_series() -> None:
    exported = _exported()
    assert not exported.keys() & NOT_EXPORTED_YET.keys(), (
        "exported now: drop it from NOT_EXPORTED_YET"
    )
    groups = yaml.safe_load((PROMETHEUS.parent / "alerts.yml").read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    names = {rule["alert"] for rule in rules}
    assert {"SkipditQueueStuck", "SkipditDeadLettersRising", "SkipditHighErrorRate"} <= names
    assert len(names) == len(rules)
    statuses = {s.value for s in JobStatus}
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert {"summary", "description"} <= rule["annotations"].keys()
        for selector in _selectors(rule["expr"]):
            assert selector.name in exported.keys() | NOT_EXPORTED_YET.keys(), selector.name
            for matcher in selector.matchers.matchers:
                if matcher.name == "status":  # job statuses that exist
                    assert set(matcher.value.split("|")) <= statuses, matcher.value


def test_dashboard_panels_query_exported_series_per_model() -> None:
    exported = _exported()
    dashboard = json.loads(DASHBOARD.read_text())
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "model"
    assert re.fullmatch(r"label_values\((\w+), model\)", variable["definition"])[1] in exported
    shown: set[str] = set()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for selector in _selectors(target["expr"]):
                assert selector.name in exported, f"{panel['title']}: {selector.name}"
                matchers = {(m.name, m.value) for m in selector.matchers.matchers}
                assert ("model", "$model") in matchers, f"{panel['title']}: not per model"
                shown.add(exported[selector.name])
    # Every series family of service/metrics.py is on the dashboard.
    assert shown == set(exported.values()), f"no panel for {set(exported.values()) - shown}"


def test_locustfile_is_valid_python_posting_generate() -> None:
    source = (ROOT / "loadtest/locustfile.py").read_text()
    ast.parse(source)
    assert '"/generate"' in source
