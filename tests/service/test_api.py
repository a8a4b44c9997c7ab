"""The HTTP API against the real app, a real database (SQLite and PostgreSQL) and the embedded broker."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.docs import DISTILL_EXAMPLE, TRAIN_EXAMPLE
from api.main import create_app
from store.artifacts import ArtifactStore
from store.db import head_revision, make_engine, session_factory
from store.jobs import claim_job, fail_job, finish_job, release_dependents
from store.results import add_checkpoint, add_evaluation, add_metrics
from store.settings import Settings
from store.workers import heartbeat


def _spec(**overrides: Any) -> dict[str, Any]:
    spec = copy.deepcopy(TRAIN_EXAMPLE)
    spec.update(overrides)
    return spec


def _distill(teacher_ref: str) -> dict[str, Any]:
    spec = copy.deepcopy(DISTILL_EXAMPLE)
    spec["teacher"]["checkpoint"] = teacher_ref
    return spec


class DB:
    """Direct store access beside the app, as a worker would have."""

    def __init__(self, settings: Settings) -> None:
        self.engine = make_engine(settings.database_url)
        self.s = session_factory(self.engine)()

    def close(self) -> None:
        self.s.close()
        self.engine.dispose()


@pytest.fixture
def db(settings: Settings) -> Any:
    d = DB(settings)
    yield d
    d.close()


def _fields(resp: Any) -> list[str]:
    return [e["field"] for e in resp.json()["detail"]]


def _finished_teacher(client: TestClient, db: DB, settings: Settings) -> int:
    """A train job that succeeded with a real final checkpoint file."""
    jid = client.post("/jobs", json=_spec()).json()["id"]
    claim_job(db.s, jid, "w1")
    store = ArtifactStore(settings.artifact_root)  # type: ignore[arg-type]
    f = store.job_dir(jid) / "checkpoints" / "final.pt"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(bytes(range(256)) * 40)
    add_checkpoint(db.s, jid, 1, 300, "final.pt", store.relative(f), f.stat().st_size, store.sha256_file(f), True)
    finish_job(db.s, jid, {"AP": 33.0})
    return jid


def test_submit_enqueues_a_real_message(client: TestClient, settings: Settings, drain: Any) -> None:
    r = client.post("/jobs", json=_spec())
    assert r.status_code == 201, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["status"] == "queued" and job["queue"] == "any" and job["attempt"] == 0
    assert job["spec"]["model"]["backbone"] == "resnet34" and job["spec"]["schedule"]["momentum"] == 0.9
    assert drain(settings.broker_url, "any") == [("icd.run_job", [job["id"]])]

    r = client.post("/jobs", json=_spec(device="cpu"))
    assert r.json()["queue"] == "cpu"
    assert drain(settings.broker_url, "cpu") == [("icd.run_job", [r.json()["id"]])]


def test_invalid_specs_name_the_field(client: TestClient) -> None:
    bad = _spec()
    bad["schedule"]["batch_size"] = 0
    r = client.post("/jobs", json=bad)
    assert r.status_code == 422
    assert _fields(r) == ["schedule.batch_size"] and "greater than or equal to 1" in r.json()["detail"][0]["msg"]

    r = client.post("/jobs", json=_spec(kind="nope"))
    assert r.status_code == 422 and _fields(r) == ["kind"]

    r = client.post("/jobs", json=_spec(colour="red"))
    assert r.status_code == 422 and _fields(r) == ["colour"]

    no_teacher = _distill("job:1")
    no_teacher["teacher"]["checkpoint"] = None
    r = client.post("/jobs", json=no_teacher)
    assert r.status_code == 422 and _fields(r) == ["teacher.checkpoint"]

    wrong_levels = _spec()
    wrong_levels["model"]["detector"] = "faster_rcnn"
    r = client.post("/jobs", json=wrong_levels)
    assert r.status_code == 422 and _fields(r) == ["model.levels"], r.text


def test_paths_are_checked_at_submit_and_resolved_against_data_roots(client: TestClient, tmp_path: Path) -> None:
    coco = _spec()
    coco["data"]["train"] = {"format": "coco", "images": "coco/images", "annotations": "coco/train.json"}
    r = client.post("/jobs", json=coco)
    assert r.status_code == 422
    assert _fields(r) == ["data.train.images", "data.train.annotations"]
    assert "in none of the roots; tried" in r.json()["detail"][0]["msg"]

    (tmp_path / "data" / "coco" / "images").mkdir(parents=True)
    (tmp_path / "data" / "coco" / "train.json").write_text("{}")
    r = client.post("/jobs", json=coco)
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["data"]["train"]["images"] == str(tmp_path / "data" / "coco" / "images")

    ck = _spec()
    ck["model"]["checkpoint"] = "missing.pt"
    r = client.post("/jobs", json=ck)
    assert r.status_code == 422 and _fields(r) == ["model.checkpoint"]


def test_job_references_wait_queue_or_fail(client: TestClient, db: DB, settings: Settings, drain: Any) -> None:
    r = client.post("/jobs", json=_distill("job:999"))
    assert r.status_code == 422 and _fields(r) == ["teacher.checkpoint"] and "does not exist" in r.text

    running = client.post("/jobs", json=_spec()).json()["id"]
    drain(settings.broker_url, "any")
    claim_job(db.s, running, "w1")
    r = client.post("/jobs", json=_distill(f"job:{running}"))
    assert r.status_code == 201
    waiting = r.json()
    assert waiting["status"] == "waiting" and waiting["depends_on"] == [running]
    assert drain(settings.broker_url, "any") == []  # nothing sent until the teacher is done

    fail_job(db.s, running, "diverged")
    release_dependents(db.s, running)
    failed = client.get(f"/jobs/{waiting['id']}").json()
    assert failed["status"] == "failed" and f"job {running} failed: diverged" in failed["error"]
    r = client.post("/jobs", json=_distill(f"job:{running}"))
    assert r.status_code == 422 and "is failed" in r.text

    teacher = _finished_teacher(client, db, settings)
    drain(settings.broker_url, "any")
    r = client.post("/jobs", json=_distill(f"job:{teacher}"))
    assert r.status_code == 201 and r.json()["status"] == "queued" and r.json()["depends_on"] == []
    assert drain(settings.broker_url, "any") == [("icd.run_job", [r.json()["id"]])]


def test_list_filters_pagination_and_detail(client: TestClient, db: DB) -> None:
    ids = [client.post("/jobs", json=_spec(name=f"exp{i % 2}")).json()["id"] for i in range(5)]
    claim_job(db.s, ids[1], "w1")
    page = client.get("/jobs", params={"limit": 2}).json()
    assert page["total"] == 5 and [j["id"] for j in page["items"]] == ids[::-1][:2]
    assert "spec" not in page["items"][0]
    page = client.get("/jobs", params={"limit": 2, "offset": 4}).json()
    assert [j["id"] for j in page["items"]] == [ids[0]]
    assert client.get("/jobs", params={"status": "running"}).json()["total"] == 1
    assert client.get("/jobs", params={"status": "queued,running", "name": "exp0"}).json()["total"] == 3
    assert client.get("/jobs", params={"kind": "distill"}).json()["total"] == 0
    assert client.get("/jobs", params={"status": "bogus"}).status_code == 422

    detail = client.get(f"/jobs/{ids[1]}").json()
    assert detail["status"] == "running" and detail["worker"] == "w1" and detail["attempts"][0]["number"] == 1
    assert detail["started_at"].endswith(("+00:00", "Z"))
    assert client.get("/jobs/12345").status_code == 404


def test_cancel_retry_delete(client: TestClient, db: DB, settings: Settings, drain: Any) -> None:
    jid = client.post("/jobs", json=_spec()).json()["id"]
    drain(settings.broker_url, "any")
    assert client.post(f"/jobs/{jid}/retry").status_code == 409
    assert client.delete(f"/jobs/{jid}").status_code == 409
    r = client.post(f"/jobs/{jid}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert client.post(f"/jobs/{jid}/cancel").status_code == 409

    r = client.post(f"/jobs/{jid}/retry")
    assert r.status_code == 200 and r.json()["status"] == "queued"
    assert drain(settings.broker_url, "any") == [("icd.run_job", [jid])]

    claim_job(db.s, jid, "w1")
    r = client.post(f"/jobs/{jid}/cancel")
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True

    fail_job(db.s, jid, "stopped")
    run_dir = ArtifactStore(settings.artifact_root).job_dir(jid)  # type: ignore[arg-type]
    (run_dir / "job.log").write_text("hello\n")
    assert client.delete(f"/jobs/{jid}").status_code == 204
    assert not run_dir.exists()
    assert client.get(f"/jobs/{jid}").status_code == 404


def test_metrics_evaluations_logs(client: TestClient, db: DB, settings: Settings) -> None:
    jid = client.post("/jobs", json=_spec()).json()["id"]
    claim_job(db.s, jid, "w1")
    add_metrics(db.s, jid, 1, [("loss", s, 1.0 / s) for s in range(1, 201)] + [("lr", s, 0.01) for s in (1, 100)])
    m = client.get(f"/jobs/{jid}/metrics").json()
    assert len(m["series"]["loss"]) == 200 and m["last_step"] == 200 and m["series"]["lr"][1] == [100, 0.01]
    m = client.get(f"/jobs/{jid}/metrics", params={"names": "loss", "since_step": 198}).json()
    assert m["series"] == {"loss": [[199, 1 / 199], [200, 1 / 200]]} and m["last_step"] == 200
    m = client.get(f"/jobs/{jid}/metrics", params={"max_points": 20, "names": "loss"}).json()
    assert 2 <= len(m["series"]["loss"]) <= 21 and m["series"]["loss"][-1][0] == 200
    assert client.get(f"/jobs/{jid}/metrics", params={"since_step": 500}).json() == {
        "job_id": jid,
        "series": {},
        "last_step": None,
        "attempt": 1,
        "resumed_from_step": None,
    }

    add_evaluation(
        db.s, jid, 1, 100, {"AP": 21.5, "AP50": 40.0, "AP75": 20.0, "APs": 5, "APm": 20, "APl": 30}, {"circle": 25.0}
    )
    ev = client.get(f"/jobs/{jid}/evaluations").json()
    assert ev[0]["ap"] == 21.5 and ev[0]["apl"] == 30 and ev[0]["per_class"] == {"circle": 25.0}

    assert client.get(f"/jobs/{jid}/logs").text == ""
    log = ArtifactStore(settings.artifact_root).job_dir(jid) / "job.log"  # type: ignore[arg-type]
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert client.get(f"/jobs/{jid}/logs", params={"tail": 2}).text == "line 98\nline 99\n"
    assert client.get(f"/jobs/{jid}/logs").text.count("\n") == 100
    assert client.get("/jobs/999/metrics").status_code == 404


def test_checkpoint_download_sha_and_ranges(client: TestClient, db: DB, settings: Settings) -> None:
    jid = _finished_teacher(client, db, settings)
    cks = client.get(f"/jobs/{jid}/checkpoints").json()
    assert [c["name"] for c in cks] == ["final.pt"] and cks[0]["final"] is True
    url = cks[0]["url"]
    r = client.get(url)
    assert r.status_code == 200
    assert r.headers["content-length"] == str(len(r.content)) == str(cks[0]["size_bytes"])
    assert r.headers["x-checkpoint-sha256"] == hashlib.sha256(r.content).hexdigest() == cks[0]["sha256"]
    assert r.headers["etag"] == f'"{cks[0]["sha256"]}"' and r.headers["accept-ranges"] == "bytes"

    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == r.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(r.content)}"
    tail = client.get(url, headers={"Range": "bytes=10000-"})
    assert tail.status_code == 206 and tail.content == r.content[10000:]
    bad = client.get(url, headers={"Range": f"bytes={len(r.content) + 10}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(r.content)}"
    head = client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(r.content))

    assert client.get(f"/jobs/{jid}/checkpoints/nope.pt").status_code == 404


def test_workers_health_version(client: TestClient, db: DB) -> None:
    h = client.get("/health")
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "degraded" and body["database"]["ok"] and body["broker"]["ok"]
    assert not body["workers"]["ok"] and "icd worker" in body["workers"]["detail"]

    heartbeat(db.s, "cpu-1@host", "host", "cpu", "cpu,any", 42, None)
    workers = client.get("/workers").json()
    assert [(w["name"], w["device"], w["queues"]) for w in workers] == [("cpu-1@host", "cpu", "cpu,any")]
    assert client.get("/health").json()["status"] == "ok"

    v = client.get("/version").json()
    assert v["version"] and v["database_revision"] == head_revision() and v["python"]


def test_broker_down_gives_503_and_leaves_no_row(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    app = create_app(down)
    try:
        with TestClient(app) as c:
            for _ in range(2):  # a client retrying after a 503 makes no duplicate
                r = c.post("/jobs", json=_spec())
                assert r.status_code == 503 and "broker unreachable" in r.json()["detail"]
                assert "nothing was recorded" in r.json()["detail"] and "location" not in r.headers
            assert c.get("/jobs").json()["total"] == 0
            h = c.get("/health").json()
            assert h["status"] == "degraded" and not h["broker"]["ok"]
    finally:
        app.state.engine.dispose()


def test_legacy_shared_token_guards_every_endpoint(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="api.auth"):
        app = create_app(settings.model_copy(update={"api_token": "s3cret"}))
    assert "icd token create" in caplog.text and "unset ICD_API_TOKEN" in caplog.text
    try:
        with TestClient(app) as c:
            r = c.post("/jobs", json=_spec())
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert c.post("/jobs", json=_spec(), headers={"Authorization": "Bearer wrong"}).status_code == 401
            r = c.post("/jobs", json=_spec(), headers={"Authorization": "Bearer s3cret"})
            assert r.status_code == 201 and r.json()["owner"] == "ICD_API_TOKEN"
            assert c.get("/jobs").status_code == 401  # reads need it too
            assert c.get("/health").status_code == 200 and c.get("/version").status_code == 200
            assert c.delete(f"/jobs/{r.json()['id']}").status_code == 401
    finally:
        app.state.engine.dispose()


def test_offline_docs_openapi_examples_and_dashboard(client: TestClient) -> None:
    html = client.get("/docs")
    assert html.status_code == 200
    assert not re.findall(r"https?://", html.text), "docs page must not load anything from the internet"
    for asset in re.findall(r'(?:src|href)="([^"]+)"', html.text):
        assert client.get(asset).status_code == 200, asset
    assert "/static/vendor/swagger-ui/swagger-ui-bundle.js" in html.text
    assert "persistAuthorization: true" in html.text

    openapi = client.get("/openapi.json").json()
    body = openapi["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]
    examples = body["examples"]
    assert examples["distill_icd"]["value"]["distill"]["method"] == "icd"
    assert examples["train_teacher"]["value"]["kind"] == "train"
    assert "discriminator" in json.dumps(openapi["components"]["schemas"]) or "oneOf" in json.dumps(body["schema"])

    r = client.get("/ui", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/"
    assert 'id="view"' in client.get("/").text
