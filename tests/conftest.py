"""Shared fixtures: small real networks with non-trivial weights; the ``redis`` and ``cluster``
markers, applied from what a test uses."""

from __future__ import annotations

import os

import torch

# Under pytest-xdist (README's command runs a worker per core): one torch thread per worker, and
# for the processes tests start, so workers do not oversubscribe the cores (OpenMP threads that
# share a core wait on each other many times over).
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# No GPU: Triton kernels run in Triton's CPU interpreter. Triton reads this when it is first
# imported, and importing diffusers (model.sampling.pipeline, below) imports it: set it before that.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, each kernel specialization the tests make autotunes over one config (compiling every
# config of 15-20 specializations from cold outlasts the GPU check's budget).
os.environ.setdefault("SKIPDIT_KERNEL_TUNING", "quick")

import pytest

# Asserts in the helpers modules report their operands as asserts in test modules do; registered
# before anything imports them.
pytest.register_assert_rewrite("tests.helpers", "tests.model.helpers", "tests.service.helpers")

from model.networks.skip_dit import SkipDiT  # noqa: E402
from model.sampling.pipeline import Pipeline  # noqa: E402
from tests import helpers  # noqa: E402
from tests.helpers import tiny  # noqa: E402

# Fixtures that start or reach a real redis-server (tests/service/conftest.py).
REDIS_FIXTURES = {"redis_server", "plain_redis", "redis_cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """``redis`` on every test that uses a real redis-server: through a Redis fixture (or one
    that depends on one), on a ``backend`` parameter of "redis" or "cluster", or marked
    ``cluster``; ``cluster`` on those that use the session's Redis Cluster or the "cluster"
    backend. (A test that starts a redis-server or a worker itself carries its marker by hand;
    ``helpers.require_marker`` fails it if it does not.)"""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("backend") if callspec is not None else None
        wanted = set()
        if fixtures & REDIS_FIXTURES or backend == "redis":
            wanted.add("redis")
        if (
            "redis_cluster" in fixtures
            or backend == "cluster"
            or item.get_closest_marker("cluster")
        ):
            wanted |= {"cluster", "redis"}
        for name in sorted(wanted - {mark.name for mark in item.iter_markers()}):
            item.add_marker(name)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before its fixtures: the test whose markers ``helpers.require_marker`` checks."""
    helpers.running_test = item


def pytest_runtest_teardown(item: pytest.Item) -> None:
    helpers.running_test = None


@pytest.fixture(scope="session")
def tiny_model() -> SkipDiT:
    """Skip-DiT, depth 4, hidden 32, 8x8 pixels, 10 classes, null class for guidance."""
    return tiny()


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model: SkipDiT) -> Pipeline:
    return Pipeline(tiny_model, default_guidance=2.0)


@pytest.fixture(scope="session")
def tiny_flow_pipeline(tiny_model: SkipDiT) -> Pipeline:
    """The tiny network served as a flow-matching model (its card's objective: flow_euler)."""
    return Pipeline(tiny_model, default_guidance=2.0, objective="flow")
