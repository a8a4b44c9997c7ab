"""What the dashboard, the docs UI and the command-line client rely on: offline Swagger UI 5 / ReDoc assets,
the dashboard's static files, YAML bodies (or 415), incremental evaluations and logs, unique operation ids."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient

from api.docs import STUDY_EXAMPLE, TRAIN_EXAMPLE
from store.artifacts import ArtifactStore
from store.db import make_engine, session_factory
from store.results import add_evaluation
from store.settings import Settings

STATIC = Path(__file__).resolve().parents[2] / "api" / "static"


def test_docs_and_redoc_load_only_local_assets_of_ui_versions_that_read_openapi_3_1(client: TestClient) -> None:
    openapi = client.get("/openapi.json").json()
    assert openapi["openapi"].startswith("3.1")
    for page in ("/docs", "/redoc"):
        html = client.get(page)
        assert html.status_code == 200
        assert not re.findall(r"https?://", html.text), f"{page} must not load anything from the internet"
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert assets, page
        for asset in assets:
            r = client.get(asset)
            assert r.status_code == 200 and len(r.content) > 500, asset
    pinned = json.loads((STATIC / "vendor" / "package.json").read_text())["dependencies"]
    assert pinned["swagger-ui-dist"].startswith("5.")  # Swagger UI 4 refuses OpenAPI 3.1 documents
    assert f'"{pinned["swagger-ui-dist"]}"' in client.get("/static/vendor/swagger-ui/swagger-ui-bundle.js").text
    examples = openapi["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert list(examples)[0] == "train_teacher" and examples["train_teacher"]["value"] == TRAIN_EXAMPLE
    assert examples["study"]["value"] == STUDY_EXAMPLE
    assert "application/yaml" in openapi["paths"]["/jobs"]["post"]["requestBody"]["content"]


def test_operation_ids_are_unique(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    ids = [op["operationId"] for ops in paths.values() for op in ops.values() if isinstance(op, dict)]
    assert len(ids) == len(set(ids)), sorted(ids)
    assert client.head("/jobs/1/checkpoints/final.pt").status_code == 404  # HEAD still served


def test_the_study_example_is_accepted_on_a_fresh_server(client: TestClient) -> None:
    r = client.post("/jobs", json=STUDY_EXAMPLE)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "study"


def test_dashboard_is_served_at_root_with_local_assets_only(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', page.text)
    assert "/static/dashboard/app.js" in assets and "/static/vendor/uplot/uPlot.iife.min.js" in assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    for js in (STATIC / "dashboard").glob("*.js"):
        text = js.read_text()
        assert not re.findall(r"https?://", text), f"{js.name} must not fetch from the internet"
        for module in re.findall(r'from "\./([\w.]+)"', text):
            assert client.get(f"/static/dashboard/{module}").status_code == 200, (js.name, module)
    assert client.get("/ui", follow_redirects=False).headers["location"] == "/"


def test_yaml_body_is_accepted_and_other_media_types_get_415(client: TestClient) -> None:
    text = yaml.safe_dump(TRAIN_EXAMPLE)
    r = client.post("/jobs", content=text, headers={"Content-Type": "application/yaml"})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["model"]["backbone"] == "resnet34"

    bad = copy.deepcopy(TRAIN_EXAMPLE)
    bad["schedule"]["lr"] = -1
    r = client.post("/jobs", content=yaml.safe_dump(bad), headers={"Content-Type": "text/yaml; charset=utf-8"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "schedule.lr"

    r = client.post("/jobs", content="name: [", headers={"Content-Type": "application/yaml"})
    assert r.status_code == 422 and "not valid YAML" in r.json()["detail"][0]["msg"]

    r = client.post("/jobs", content="<spec/>", headers={"Content-Type": "application/xml"})
    assert r.status_code == 415 and "application/yaml" in r.json()["detail"]


def test_evaluations_since_step_return_only_newer_ones(client: TestClient, settings: Settings) -> None:
    job_id = client.post("/jobs", json=TRAIN_EXAMPLE).json()["id"]
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        for step, ap in ((100, 1.0), (200, 2.0), (300, 3.0)):
            add_evaluation(s, job_id, 1, step, {"AP": ap, "AP50": 2 * ap}, {})
    engine.dispose()
    assert [e["step"] for e in client.get(f"/jobs/{job_id}/evaluations").json()] == [100, 200, 300]
    newer = client.get(f"/jobs/{job_id}/evaluations", params={"since_step": 100}).json()
    assert [(e["step"], e["ap"]) for e in newer] == [(200, 2.0), (300, 3.0)]
    assert client.get(f"/jobs/{job_id}/evaluations", params={"since_step": 300}).json() == []


def test_logs_offset_tail_and_follow(client: TestClient, settings: Settings) -> None:
    job_id = client.post("/jobs", json=TRAIN_EXAMPLE).json()["id"]
    assert client.get(f"/jobs/{job_id}/logs").headers["x-log-offset"] == "0"
    log = ArtifactStore(settings.artifact_root or settings.home / "artifacts").log_path(job_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("one\ntwo\nthree\n")

    r = client.get(f"/jobs/{job_id}/logs")
    assert r.text == "one\ntwo\nthree\n" and r.headers["x-log-offset"] == str(len(r.text))
    assert client.get(f"/jobs/{job_id}/logs", params={"tail": 2}).text == "two\nthree\n"
    offset = int(r.headers["x-log-offset"])
    with open(log, "a") as f:
        f.write("four\n")
    more = client.get(f"/jobs/{job_id}/logs", params={"offset": offset})
    assert more.text == "four\n" and more.headers["x-log-offset"] == str(offset + 5)
    assert client.get(f"/jobs/{job_id}/logs", params={"offset": 10**9}).text == ""

    client.post(f"/jobs/{job_id}/cancel")  # queued → canceled: a finished job's followed log ends at once
    with client.stream("GET", f"/jobs/{job_id}/logs", params={"follow": "true", "offset": 4}) as s:
        assert "".join(s.iter_text()) == "two\nthree\nfour\n"


def test_search_matches_name_substring_or_id(client: TestClient) -> None:
    a = client.post("/jobs", json={**TRAIN_EXAMPLE, "name": "Teacher-R34_big"}).json()["id"]
    b = client.post("/jobs", json={**TRAIN_EXAMPLE, "name": "student-r18"}).json()["id"]
    names = lambda q: [j["id"] for j in client.get("/jobs", params={"search": q}).json()["items"]]  # noqa: E731
    assert names("r34_") == [a] and names("R18") == [b] and names("r") == [b, a]
    assert names(str(b)) == [b] and names("%") == []
    assert client.get("/jobs", params={"search": "r", "limit": 1}).json()["total"] == 2
