"""A realistic mix of clients for ``skipdit serve``: locust users that each start one of these
every ``SKIPDIT_LOAD_PACING`` seconds (constant pacing: offered load = users / pacing):

- sync (4): ``POST /generate`` and wait for the images;
- sse (2): async submit with an Idempotency-Key (one in four sends it twice: both answers must
  name one job), follow ``/jobs/{id}/events`` to the end, fetch the result;
- poll (2): async submit, poll ``/jobs/{id}`` until it ends, fetch the result;
- cancel (1): async submit of a long job, ``DELETE`` it a moment later, poll until it ends;
- bad (1): an invalid body, which must get 422.

Every request draws a class label, a seed and a cache_interval 1-4. Each job's end-to-end time
(submit to result) is reported to locust as request type ``JOB`` and appended, with its id,
outcome and idempotency key, to the ledger file ``SKIPDIT_LOAD_LEDGER`` (JSON lines) that
``loadtest/run.py`` checks for lost and duplicated jobs. 429 (back-pressure) counts as a
success and is logged as rejected: the job was never accepted.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 60s
"""

from __future__ import annotations

import json
import os
import random
import time
import uuid
from typing import Any

from locust import HttpUser, constant_pacing, events, task

STEPS = int(os.environ.get("SKIPDIT_LOAD_STEPS", "50"))
PACING = float(os.environ.get("SKIPDIT_LOAD_PACING", "1.0"))
LEDGER = os.environ.get("SKIPDIT_LOAD_LEDGER")
POLL_S = 0.1
JOB_TIMEOUT_S = 120.0


def _write(entry: dict[str, Any]) -> None:
    if LEDGER:
        with open(LEDGER, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _body(**extra: Any) -> dict[str, Any]:
    return {
        "class_label": random.randrange(10),
        "seed": random.randrange(2**31),
        "steps": STEPS,
        "cache_interval": random.randint(1, 4),
        **extra,
    }


class ServiceUser(HttpUser):
    wait_time = constant_pacing(PACING)

    def _job(self, kind: str, began: float, job_id: str | None, status: str, **extra: Any) -> None:
        """One ledger line, and the job's end-to-end time as a locust sample."""
        seconds = time.perf_counter() - began
        _write({"kind": kind, "job_id": job_id, "status": status, "seconds": seconds,
                "at": time.time(), **extra})  # fmt: skip
        if status == "rejected":
            return
        error = None if status in ("done", "cancelled") else RuntimeError(status)
        events.request.fire(request_type="JOB", name=kind, response_time=seconds * 1000,
                            response_length=0, exception=error, context={})  # fmt: skip

    def _submit(self, kind: str, body: dict, headers: dict | None = None) -> tuple[str | None, str]:
        """(job id, outcome) of an async submit; outcome 'accepted', 'rejected' or an error."""
        with self.client.post("/generate", json=body, headers=headers or {}, name=f"submit {kind}",
                              catch_response=True) as r:  # fmt: skip
            if r.status_code == 202:
                return r.json()["id"], "accepted"
            if r.status_code == 429:
                r.success()
                return None, "rejected"
            r.failure(f"submit: {r.status_code} {r.text[:200]}")
            return None, f"http_{r.status_code}"

    def _until_ended(self, job_id: str) -> str:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            r = self.client.get(f"/jobs/{job_id}", name="/jobs/{id}")
            if r.status_code == 200 and r.json()["status"] not in ("queued", "running"):
                return r.json()["status"]
            time.sleep(POLL_S)
        return "timeout"

    def _result(self, job_id: str) -> bool:
        return (
            self.client.get(f"/jobs/{job_id}/result", name="/jobs/{id}/result").status_code == 200
        )

    @task(4)
    def sync(self) -> None:
        began = time.perf_counter()
        with self.client.post("/generate", json=_body(), name="generate sync",
                              catch_response=True) as r:  # fmt: skip
            if r.status_code == 200:
                self._job("sync", began, r.json()["id"], r.json()["status"])
            elif r.status_code == 429:
                r.success()
                self._job("sync", began, None, "rejected")
            else:
                r.failure(f"{r.status_code} {r.text[:200]}")
                self._job("sync", began, None, f"http_{r.status_code}")

    @task(2)
    def sse(self) -> None:
        began, key = time.perf_counter(), uuid.uuid4().hex
        body, headers = _body(**{"async": True}), {"Idempotency-Key": key}
        job_id, outcome = self._submit("sse", body, headers)
        if job_id is None:
            self._job("sse", began, None, outcome)
            return
        again = None
        if random.random() < 0.25:  # a client retrying its submit: must be the same job
            again, _ = self._submit("sse", body, headers)
        status = "timeout"
        with self.client.get(f"/jobs/{job_id}/events", name="/jobs/{id}/events", stream=True,
                             timeout=JOB_TIMEOUT_S, catch_response=True) as r:  # fmt: skip
            for line in r.iter_lines(decode_unicode=True):
                if line.startswith("data: "):
                    status = json.loads(line[len("data: ") :])["type"]
        if status == "done" and not self._result(job_id):
            status = "no_result"
        self._job("sse", began, job_id, status, key=key, resubmitted_id=again)

    @task(2)
    def poll(self) -> None:
        began = time.perf_counter()
        job_id, outcome = self._submit("poll", _body(**{"async": True}))
        if job_id is None:
            self._job("poll", began, None, outcome)
            return
        status = self._until_ended(job_id)
        if status == "done" and not self._result(job_id):
            status = "no_result"
        self._job("poll", began, job_id, status)

    @task(1)
    def cancel(self) -> None:
        began = time.perf_counter()
        job_id, outcome = self._submit("cancel", _body(**{"async": True, "steps": 4 * STEPS}))
        if job_id is None:
            self._job("cancel", began, None, outcome)
            return
        time.sleep(random.uniform(0.0, 0.5))
        self.client.delete(f"/jobs/{job_id}", name="/jobs/{id} cancel")
        self._job("cancel", began, job_id, self._until_ended(job_id))

    @task(1)
    def bad(self) -> None:
        body = random.choice([_body(class_label=99), _body(steps=0), _body(cache_interval=0),
                              {"class_label": "seven"}])  # fmt: skip
        with self.client.post("/generate", json=body, name="generate invalid",
                              catch_response=True) as r:  # fmt: skip
            if r.status_code == 422 and r.json()["error"].get("field"):
                r.success()
            else:
                r.failure(f"invalid body got {r.status_code}, want 422 naming the field")
