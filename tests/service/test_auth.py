"""Named tokens and owners on a server that listens beyond loopback: 401 without a token on every
non-public endpoint, 404 on another owner's job, admins see everything; refusal to start unguarded."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.auth import StartupRefused
from api.docs import TRAIN_EXAMPLE
from api.main import create_app
from store.db import make_engine, session_factory
from store.models import ApiToken
from store.settings import Settings
from store.tokens import TokenError, create_token, find_token, list_tokens, revoke_token
from tests.helpers import succeed_with_checkpoint

PUBLIC = {"/health", "/version"}


def _public_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"listen_host": "0.0.0.0"})


def _as(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_tokens_are_stored_hashed_and_revocable(session: Any) -> None:
    token, secret = create_token(session, "carol")
    assert secret.startswith("icd_") and len(secret) > 40
    stored = session.get(ApiToken, token.id)
    assert stored is not None and secret not in (stored.secret_sha256, stored.name) and len(stored.secret_sha256) == 64
    found = find_token(session, secret)
    assert found is not None and found.name == "carol"
    with pytest.raises(TokenError, match="exists"):
        create_token(session, "carol")
    with pytest.raises(TokenError, match="token name"):
        create_token(session, "bad name\x00")
    revoke_token(session, "carol")
    assert find_token(session, secret) is None and list_tokens(session) == []
    with pytest.raises(TokenError, match="no token named"):
        revoke_token(session, "carol")


def test_refuses_to_listen_beyond_loopback_unguarded(settings: Settings) -> None:
    with pytest.raises(StartupRefused, match="icd token create --name admin --admin"):
        create_app(_public_settings(settings))
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        create_token(s, "root", admin=True)
    engine.dispose()
    with pytest.raises(StartupRefused, match="ICD_DATA_ROOTS"):
        create_app(_public_settings(settings).model_copy(update={"data_roots": []}))


def test_anonymous_gets_401_on_every_non_public_endpoint(public: TestClient) -> None:
    spec = public.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["token"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["token"]["description"],
    }
    checked = 0
    for path, ops in spec["paths"].items():
        url = re.sub(r"\{job_id\}", "1", path).replace("{name}", "final.pt")
        for method, op in ops.items():
            if path in PUBLIC:
                assert "401" not in op["responses"]
                assert public.request(method, url).status_code == 200, path
                continue
            assert "401" in op["responses"] and op.get("security"), (method, path)
            r = public.request(method, url, json={} if method == "post" else None)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (method, path, r.text)
            assert method == "head" or "icd token create" in r.json()["detail"]
            checked += 1
    assert checked >= 14
    assert public.get("/jobs", headers=_as("icd_revoked-or-made-up")).status_code == 401
    docs = public.get("/docs")
    assert docs.status_code == 200 and public.get("/").status_code == 200  # the docs and the dashboard page
    for asset in re.findall(r'(?:src|href)="(/[^"]+)"', docs.text):  # and the static files they load
        assert public.get(asset).status_code == 200, asset


def _job_with_checkpoint(client: TestClient, settings: Settings, secret: str) -> int:
    r = client.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE), headers=_as(secret))
    assert r.status_code == 201, r.text
    succeed_with_checkpoint(settings.database_url, settings.artifact_root, r.json()["id"])  # type: ignore[arg-type]
    return r.json()["id"]


def test_another_owner_gets_404_and_admins_see_all(
    public: TestClient, settings: Settings, secrets_by_name: dict[str, str]
) -> None:
    alice, bob, root = (_as(secrets_by_name[n]) for n in ("alice", "bob", "root"))
    a = _job_with_checkpoint(public, settings, secrets_by_name["alice"])
    b = _job_with_checkpoint(public, settings, secrets_by_name["bob"])
    assert public.get(f"/jobs/{a}", headers=alice).json()["owner"] == "alice"

    for method, url in [
        ("get", f"/jobs/{a}"),
        ("post", f"/jobs/{a}/cancel"),
        ("post", f"/jobs/{a}/retry"),
        ("delete", f"/jobs/{a}"),
        ("get", f"/jobs/{a}/checkpoints"),
        ("get", f"/jobs/{a}/checkpoints/final.pt"),
        ("get", f"/jobs/{a}/metrics"),
        ("get", f"/jobs/{a}/evaluations"),
        ("get", f"/jobs/{a}/logs"),
    ]:
        r = public.request(method, url, headers=bob)
        assert r.status_code == 404 and r.json()["detail"] == f"job {a} not found", (method, url, r.text)
    # bob cannot name alice's job as a teacher either: it does not exist for him
    distill = {**copy.deepcopy(TRAIN_EXAMPLE), "kind": "distill"}
    model = distill.pop("model")
    distill.update(teacher={**model, "checkpoint": f"job:{a}"}, student={**model, "backbone": "resnet18"})
    r = public.post("/jobs", json=distill, headers=bob)
    assert r.status_code == 422 and f"job {a} does not exist" in r.text

    assert [j["id"] for j in public.get("/jobs", headers=alice).json()["items"]] == [a]
    assert [j["id"] for j in public.get("/jobs", headers=bob).json()["items"]] == [b]
    assert public.get("/jobs", headers=root).json()["total"] == 2
    assert public.get(f"/jobs/{a}/checkpoints/final.pt", headers=alice).content == b"weights"
    assert public.get(f"/jobs/{b}", headers=root).status_code == 200
    assert public.delete(f"/jobs/{a}", headers=root).status_code == 204  # an admin manages anyone's job
    assert public.delete(f"/jobs/{b}", headers=bob).status_code == 204


def test_loopback_default_needs_no_token_and_knows_tokens(client: TestClient, settings: Settings) -> None:
    r = client.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE))
    assert r.status_code == 201 and r.json()["owner"] is None  # anonymous = the local admin
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        _, secret = create_token(s, "dave")
    engine.dispose()
    mine = client.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE), headers=_as(secret)).json()["id"]
    assert [j["id"] for j in client.get("/jobs", headers=_as(secret)).json()["items"]] == [mine]
    assert client.get("/jobs").json()["total"] == 2
    assert client.get("/jobs", headers=_as("wrong")).status_code == 401


def test_the_token_command_creates_lists_and_revokes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from icd_cli.main import main

    monkeypatch.setenv("ICD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ICD_DATABASE_URL", raising=False)
    runner = CliRunner()
    made = runner.invoke(main, ["token", "create", "--name", "erin", "--admin"])
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip().splitlines()[0]
    assert secret.startswith("icd_")
    listed = runner.invoke(main, ["token", "list"])
    assert listed.exit_code == 0 and "erin\tadmin" in listed.stdout and secret not in listed.stdout
    assert runner.invoke(main, ["token", "create", "--name", "erin"]).exit_code == 1
    assert runner.invoke(main, ["token", "revoke", "erin"]).exit_code == 0
    assert runner.invoke(main, ["token", "revoke", "erin"]).exit_code == 1


def test_a_request_reaching_a_network_address_needs_a_token_whatever_the_settings(settings: Settings) -> None:
    """`uvicorn api.main:app --host 0.0.0.0` without ICD_LISTEN_HOST: the connection's local address decides."""
    app = create_app(settings)  # listen_host left at 127.0.0.1
    try:
        with TestClient(app, base_url="http://10.1.2.3:8000") as remote:
            assert remote.get("/jobs").status_code == 401
            assert remote.get("/health").status_code == 200
        with TestClient(app, base_url="http://127.0.0.1:8000") as local:
            assert local.get("/jobs").status_code == 200
    finally:
        app.state.engine.dispose()


def test_a_revoked_name_is_not_reissued_with_its_jobs_by_accident(session: Any) -> None:
    """A new holder of a revoked token's name would see the old holder's jobs: that must be said on purpose."""
    from store.jobs import create_job

    create_token(session, "frank")
    create_job(session, copy.deepcopy(TRAIN_EXAMPLE), kind="train", name="x", queue="any", owner="frank")
    revoke_token(session, "frank")
    with pytest.raises(TokenError, match="takes-over-jobs"):
        create_token(session, "frank")
    token, _ = create_token(session, "frank", takes_over_jobs=True)
    assert token.name == "frank"


def test_a_user_sees_only_its_own_job_on_the_workers_list(
    public: TestClient, settings: Settings, secrets_by_name: dict[str, str]
) -> None:
    from store.workers import heartbeat

    a = public.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE), headers=_as(secrets_by_name["alice"])).json()["id"]
    engine = make_engine(settings.database_url)
    with session_factory(engine)() as s:
        heartbeat(s, "w1@host", "host", "cpu", "cpu", 1, a)
    engine.dispose()
    seen = {n: public.get("/workers", headers=_as(secrets_by_name[n])).json() for n in ("alice", "bob", "root")}
    assert [w["current_job_id"] for w in seen["alice"]] == [a]
    assert [w["current_job_id"] for w in seen["bob"]] == [None]  # busy with someone else's job: not whose
    assert [w["current_job_id"] for w in seen["root"]] == [a]
