"""A sweep's books on a real database (SQLite and PostgreSQL), without training: submit-time checks, trials
created up to `parallel` under one turn, the budget, the close with its report, the 'pruned' status."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from store import jobs as q
from store.artifacts import ArtifactStore
from store.db import make_engine, session_factory
from store.settings import get_settings
from store.sweeps import take_turn, trial_rows
from tests.helpers import tiny_train_spec


@pytest.fixture
def env(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Session]]:
    """Sessions on the test database; the worker's settings (artifact root) in tmp_path."""
    monkeypatch.setenv("ICD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ICD_DATABASE_URL", db_url)
    get_settings.cache_clear()
    engine = make_engine(db_url)
    yield session_factory(engine)
    engine.dispose()
    get_settings.cache_clear()


def sweep_spec(**over: Any) -> dict[str, Any]:
    return {
        "kind": "sweep",
        "name": "sw",
        "base": tiny_train_spec(iterations=8, every=2),
        "space": {"schedule.lr": {"log_uniform": [1e-4, 0.1]}},
        "sampler": {"kind": "random", "seed": 3},
        "trials": 3,
        "parallel": 2,
        **over,
    }


def _end_trial(s: Session, job_id: int, ap: float | None, status: str = "succeeded") -> None:
    q.claim_job(s, job_id, "w")
    if status == "succeeded":
        q.finish_job(s, job_id, {"AP": ap} if ap is not None else {})
    elif status == "pruned":
        q.mark_pruned(s, job_id, "AP 0.0 at step 2, below the median", {"AP": 0.0, "pruned_at_step": 2.0}, 2)
    else:
        q.fail_job(s, job_id, "diverged")


def test_trials_are_created_up_to_parallel_then_to_the_budget_and_the_sweep_closes(env: Any) -> None:
    from worker.sweep import advance, child_ended, start_sweep

    s = env()
    sweep = q.claim_job(s, q.create_job(s, sweep_spec(), "sweep", "sw", "cpu").id, "w0")
    first = start_sweep(s, sweep)
    assert [c.name for c in first] == ["sw/trial0", "sw/trial1"] and all(c.status == "queued" for c in first)
    assert q.get_job(s, sweep.id).status == "waiting"
    assert start_sweep(s, q.get_job(s, sweep.id)) == []  # a redelivered task creates nothing more
    assert advance(s, sweep.id) == []  # two are running: parallel is used up
    rows = trial_rows(s, sweep.id)
    assert [t.number for t, _ in rows] == [0, 1]
    assert rows[0][1].spec["schedule"]["lr"] == rows[0][0].params["schedule.lr"]

    _end_trial(s, first[0].id, 20.0)
    (third,) = child_ended(s, first[0].id) or []
    assert third.name == "sw/trial2" and child_ended(s, first[0].id) == []  # budget of 3 reached
    _end_trial(s, first[1].id, None, "pruned")
    assert child_ended(s, first[1].id) == [] and q.get_job(s, sweep.id).status == "waiting"
    _end_trial(s, third.id, 31.5)
    assert child_ended(s, third.id) == []

    done = q.get_job(s, sweep.id)
    assert done.status == "succeeded" and done.progress_step == done.progress_total == 3
    assert done.final_metrics["best_AP"] == 31.5 and done.final_metrics["best_trial"] == 2
    assert done.final_metrics["best_job_id"] == third.id and done.final_metrics["trials_pruned"] == 1
    report = json.loads((ArtifactStore(get_settings().artifact_root).report_dir(sweep.id) / "report.json").read_text())
    assert report["best"]["number"] == 2 and report["trials"][1]["status"] == "pruned"
    assert report["trials"][1]["reason"] == "AP 0.0 at step 2, below the median"
    s.close()


def test_only_one_process_takes_a_sweeps_turn(env: Any) -> None:
    from worker.sweep import advance, start_sweep

    s, other = env(), env()
    sweep = q.claim_job(s, q.create_job(s, sweep_spec(parallel=1), "sweep", "sw", "cpu").id, "w0")
    (trial,) = start_sweep(s, sweep)
    _end_trial(s, trial.id, 10.0)
    assert take_turn(other, sweep.id)  # another process holds it now
    assert advance(s, sweep.id) == []  # so this one creates nothing (the upkeep comes back later)
    from store.sweeps import end_turn

    end_turn(other, sweep.id)
    assert [c.name for c in advance(s, sweep.id)] == ["sw/trial1"]
    s.close()
    other.close()


def test_a_sweep_with_no_finished_trial_fails_and_says_why(env: Any) -> None:
    from worker.sweep import child_ended, start_sweep

    s = env()
    sweep = q.claim_job(s, q.create_job(s, sweep_spec(trials=1, parallel=1), "sweep", "sw", "cpu").id, "w0")
    (trial,) = start_sweep(s, sweep)
    _end_trial(s, trial.id, None, "failed")
    child_ended(s, trial.id)
    failed = q.get_job(s, sweep.id)
    assert failed.status == "failed" and failed.error.startswith("no trial finished with a AP (1 failed)")
    s.close()


def test_a_cancel_requested_before_pruning_wins(env: Any) -> None:
    s = env()
    job = q.create_job(s, tiny_train_spec(), "train", "t", "cpu")
    q.claim_job(s, job.id, "w")
    q.request_cancel(s, job.id)
    assert q.mark_pruned(s, job.id, "low", {"AP": 0.0}, 2).status == "canceled"
    s.close()


def test_submit_checks_a_sweep_and_trials_are_served(client: TestClient, env: Any) -> None:
    r = client.post("/jobs", json=sweep_spec(space={"schedule.lrr": {"uniform": [0.1, 0.2]}}))
    assert r.status_code == 422
    assert r.json()["detail"][0]["field"] == "space.schedule.lrr", r.json()
    r = client.post("/jobs", json=sweep_spec(space={"schedule.batch_size": {"int": [1, 65]}}))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "space.schedule.batch_size", r.json()
    assert "above this server's limit of 64" in r.json()["detail"][0]["msg"]
    bad_base = sweep_spec()
    bad_base["base"]["schedule"]["batch_size"] = 0
    r = client.post("/jobs", json=bad_base)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "base.schedule.batch_size", r.json()

    r = client.post("/jobs", json=sweep_spec())
    assert r.status_code == 201, r.text
    sweep = r.json()
    assert sweep["kind"] == "sweep" and sweep["queue"] == "cpu"
    view = client.get(f"/jobs/{sweep['id']}/trials").json()
    assert view["trials"] == [] and view["best"] is None and view["budget"] == 3
    assert client.get(f"/jobs/{sweep['id']}/report").status_code == 404  # no report before it closes
    assert client.get("/jobs", params={"kind": "sweep"}).json()["items"][0]["id"] == sweep["id"]
    assert client.get("/jobs", params={"status": "pruned"}).status_code == 200
