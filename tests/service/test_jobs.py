"""The job state machine: every transition, and that the first terminal state wins."""

from __future__ import annotations

import itertools
import json

import pytest

from service import jobs
from service.messages import Event, EventKind, JobRecord, JobStatus

NOW = 5000.0
TERMINAL = [s for s in JobStatus if s.terminal]


def queued(**kw: object) -> JobRecord:
    return JobRecord(
        request={"steps": 10, "timeout_s": 60}, created_at=1000.0, total_steps=10, **kw
    )


def running(**kw: object) -> JobRecord:
    change = jobs.start(queued(**kw), "w1", 1001.0)
    assert change is not None
    return change.record


def ended(status: JobStatus) -> JobRecord:
    change = jobs.finish(running(), status, 1002.0)
    assert change is not None
    return change.record


def test_submit_publishes_queued_and_leaves_the_record_as_it_is() -> None:
    record = queued()
    change = jobs.submit(record, NOW)
    assert change.record is record and record.status is JobStatus.QUEUED
    assert change.event == Event(EventKind.QUEUED, record.id, 0, 10, time=NOW)
    assert record.deadline == 1060.0  # created_at + timeout_s


def test_start_runs_a_queued_job_on_a_worker_without_touching_the_input() -> None:
    record = queued()
    change = jobs.start(record, "w1", NOW)
    assert change is not None and change.event is None  # the engine's STARTED is the event
    assert change.record.status is JobStatus.RUNNING
    assert (change.record.worker, change.record.started_at) == ("w1", NOW)
    assert record.status is JobStatus.QUEUED and record.worker is None


def test_start_again_hands_a_running_job_to_the_next_worker() -> None:
    change = jobs.start(running(), "w2", NOW)  # the first worker died holding it
    assert change is not None and change.record.worker == "w2"
    assert change.record.started_at == NOW


@pytest.mark.parametrize("status", TERMINAL)
def test_an_ended_job_refuses_every_transition(status: JobStatus) -> None:
    record = ended(status)
    assert jobs.start(record, "w2", NOW) is None
    assert jobs.progress(record, EventKind.STEP, 3, 10, NOW, "full") is None
    assert jobs.release(record) is None
    assert jobs.request_cancel(record, NOW) is None
    assert not jobs.cancel_pending(record)


@pytest.mark.parametrize(("first", "second"), list(itertools.product(TERMINAL, TERMINAL)))
def test_the_first_terminal_state_wins(first: JobStatus, second: JobStatus) -> None:
    record = ended(first)
    assert jobs.finish(record, second, NOW, error={"code": "x", "message": "late"}) is None
    assert record.status is first and record.finished_at == 1002.0


def test_progress_records_the_step_and_publishes_it() -> None:
    change = jobs.progress(running(), EventKind.STEP, 3, 10, NOW, "cached")
    assert change is not None and change.record.step == 3
    assert change.event == Event(EventKind.STEP, change.record.id, 3, 10, "cached", time=NOW)
    assert change.record.status is JobStatus.RUNNING


@pytest.mark.parametrize("kind", [EventKind.QUEUED, EventKind.DONE, EventKind.CANCELLED])
def test_progress_is_only_started_or_step(kind: EventKind) -> None:
    assert jobs.progress(running(), kind, 3, 10, NOW) is None


def test_release_puts_a_running_job_back_in_the_queue() -> None:
    change = jobs.release(running(step=4))
    assert change is not None and change.event is None
    assert change.record.status is JobStatus.QUEUED and change.record.finished_at is None


def test_cancel_of_a_queued_job_ends_it_at_once() -> None:
    change = jobs.request_cancel(queued(), NOW)
    assert change is not None
    assert change.record.status is JobStatus.CANCELLED and change.record.finished_at == NOW
    assert change.event is not None and change.event.type is EventKind.CANCELLED
    assert change.event.terminal


def test_cancel_of_a_running_job_waits_for_its_worker() -> None:
    record = running()
    assert jobs.request_cancel(record, NOW) is None
    assert jobs.cancel_pending(record)
    assert not jobs.cancel_pending(queued())


def test_finish_done_stores_the_result_metadata() -> None:
    change = jobs.finish(running(step=10), JobStatus.DONE, NOW, result={"speedup": 1.5})
    assert change is not None
    assert change.record.result == {"speedup": 1.5} and change.record.error is None
    assert change.event == Event(EventKind.DONE, change.record.id, 10, 10, time=NOW)


def test_finish_with_an_error_puts_its_message_on_the_event() -> None:
    error = {"code": "expired", "message": "deadline passed while running"}
    change = jobs.finish(running(), JobStatus.EXPIRED, NOW, error=error)
    assert change is not None and change.record.error == error
    assert change.event is not None
    assert (change.event.type, change.event.message) == (EventKind.EXPIRED, error["message"])


@pytest.mark.parametrize("status", [JobStatus.QUEUED, JobStatus.RUNNING])
def test_finish_needs_a_terminal_status(status: JobStatus) -> None:
    with pytest.raises(ValueError, match=status.value):
        jobs.finish(running(), status, NOW)


def test_every_terminal_status_has_its_event_and_back() -> None:
    assert set(jobs.ENDED) == set(TERMINAL)
    assert {k for k in EventKind if k.terminal} == set(jobs.ENDED_BY)
    for status, kind in jobs.ENDED.items():
        assert jobs.ENDED_BY[kind] is status


def test_records_and_events_round_trip_through_json() -> None:
    change = jobs.finish(running(), JobStatus.FAILED, NOW, error={"code": "c", "message": "m"})
    assert change is not None and change.event is not None
    record = JobRecord(**json.loads(json.dumps(change.record.to_dict())))
    event = Event(**json.loads(json.dumps(change.event.to_dict())))
    assert record == change.record and record.status is JobStatus.FAILED
    assert event == change.event and event.type is EventKind.FAILED
    assert change.event.to_dict()["type"] == "failed"
