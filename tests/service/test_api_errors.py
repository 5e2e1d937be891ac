"""The error mapping on its own: every typed error answers with its status, code and field."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI

from model.errors import FieldError
from service import errors
from service.api.errors import STATUS, install
from service.metrics import Metrics

RAISED = {
    "field": FieldError("steps", "must be in [1, 250], got 999"),
    "not_found": errors.JobNotFound("abc"),
    "no_file": errors.FileNotFound(),
    "not_ready": errors.ResultNotReady("job abc is running"),
    "cancelled": errors.JobCancelled("job abc was cancelled"),
    "expired": errors.ResultExpired("result of job abc has expired"),
    "full": errors.QueueFull(7, 2.4),
    "no_key": errors.Unauthorized("unknown API key"),
    "not_yours": errors.Forbidden("abc"),
    "limited": errors.RateLimited("this API key is over 5 submissions a second", 0.3),
    "failed": errors.GenerationFailed("boom"),
    "down": errors.BackendUnavailable("redis unreachable"),
    "stopped": errors.WorkerStopped("the embedded worker has stopped"),
    "deadline": errors.DeadlineExceeded("job abc passed its deadline"),
}
EXPECTED = {
    "field": (422, "invalid_request", "steps"),
    "not_found": (404, "not_found", "job_id"),
    "no_file": (404, "not_found", None),
    "not_ready": (409, "not_ready", None),
    "cancelled": (409, "cancelled", None),
    "expired": (410, "expired", None),
    "full": (429, "queue_full", None),
    "no_key": (401, "unauthorized", None),
    "not_yours": (403, "forbidden", "job_id"),
    "limited": (429, "rate_limited", None),
    "failed": (500, "generation_failed", None),
    "down": (503, "backend_unavailable", None),
    "stopped": (503, "worker_stopped", None),
    "deadline": (504, "deadline_exceeded", None),
}


def test_every_service_error_type_is_mapped() -> None:
    assert set(errors.ServiceError.__subclasses__()) <= set(STATUS)
    assert {type(e) for e in RAISED.values()} == set(STATUS)


@pytest.fixture
def app() -> FastAPI:
    app = FastAPI()
    app.state.service = SimpleNamespace(metrics=Metrics())
    install(app)

    @app.get("/raise/{name}")
    async def raise_(name: str) -> None:
        raise RAISED[name]

    return app


async def test_each_error_answers_with_its_status_code_and_field(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for name, (status, code, field) in EXPECTED.items():
            response = await client.get(f"/raise/{name}")
            assert response.status_code == status, name
            body = response.json()["error"]
            assert body["code"] == code and body.get("field") == field, body
            assert body["message"] == str(RAISED[name])
        full = await client.get("/raise/full")
        assert full.headers["Retry-After"] == "3"  # rounded up: never before it is advised
        assert (await client.get("/raise/limited")).headers["Retry-After"] == "1"
        assert (await client.get("/raise/no_key")).headers["WWW-Authenticate"].startswith("Bearer")
    registry = app.state.service.metrics.registry
    labels = {"model": "", "reason": "backend_unavailable"}  # no one model's fault
    assert registry.get_sample_value("skipdit_errors_total", labels) == 1
    labels["reason"] = "generation_failed"
    assert registry.get_sample_value("skipdit_errors_total", labels) is None
