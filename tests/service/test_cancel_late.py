"""A cancel the API answers 200 ends the job canceled, even when it arrives while the run writes final.pt;
a cancel that arrives after the job ended, or while it ends, is answered 409 saying it already finished.
Through the API on SQLite and PostgreSQL, with the worker's store calls made beside it."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.docs import TRAIN_EXAMPLE
from store import jobs as q
from store.settings import Settings
from tests.service.test_api import db  # noqa: F401  (fixture)


def _running(client: TestClient, db: Any, settings: Settings, drain: Any) -> int:  # noqa: F811
    jid = client.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE)).json()["id"]
    drain(settings.broker_url, "any")
    assert q.claim_job(db.s, jid, "w1") is not None
    return int(jid)


def test_a_cancel_during_the_final_write_wins(client: TestClient, db: Any, settings: Settings, drain: Any) -> None:  # noqa: F811
    jid = _running(client, db, settings, drain)
    r = client.post(f"/jobs/{jid}/cancel")  # the trainer is inside atomic_save(final.pt): no step check is left
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["cancel_requested"] is True

    ended = q.finish_job(db.s, jid, {"AP": 1.0}, attempt=1)  # the worker records its finished run
    assert ended is not None and ended.status == "canceled"
    job = client.get(f"/jobs/{jid}").json()
    assert job["status"] == "canceled" and job["final_metrics"] is None and job["cancel_requested"] is False
    assert [a["status"] for a in job["attempts"]] == ["canceled"]
    r = client.post(f"/jobs/{jid}/cancel")
    assert r.status_code == 409 and r.json()["detail"].startswith(f"job {jid} already finished: it is canceled")
    assert client.post(f"/jobs/{jid}/retry").json()["status"] == "queued"  # resumes from final.pt


def test_a_cancel_after_the_job_succeeded_is_too_late(
    client: TestClient,
    db: Any,  # noqa: F811
    settings: Settings,
    drain: Any,
) -> None:
    jid = _running(client, db, settings, drain)
    q.finish_job(db.s, jid, {"AP": 1.0}, attempt=1)
    r = client.post(f"/jobs/{jid}/cancel")
    assert r.status_code == 409 and r.json()["detail"].startswith(f"job {jid} already finished: it is succeeded")
    assert client.get(f"/jobs/{jid}").json()["status"] == "succeeded"


def test_a_job_that_ends_while_the_cancel_is_answered_gets_409_not_200(
    client: TestClient,
    db: Any,  # noqa: F811
    settings: Settings,
    drain: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The API reads the job 'running', then the worker records success before the cancel's UPDATE."""
    jid = _running(client, db, settings, drain)
    real, raced = q._require, []

    def read_then_the_worker_finishes(s: Any, job_id: int) -> Any:
        job = real(s, job_id)
        if job_id == jid and not raced:
            raced.append(job.status)
            q.finish_job(db.s, jid, {"AP": 1.0}, attempt=1)
        return job

    monkeypatch.setattr(q, "_require", read_then_the_worker_finishes)
    r = client.post(f"/jobs/{jid}/cancel")
    assert raced == ["running"]
    assert r.status_code == 409 and "already finished: it is succeeded" in r.json()["detail"]
    monkeypatch.undo()
    assert client.get(f"/jobs/{jid}").json()["status"] == "succeeded"
