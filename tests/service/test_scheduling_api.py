"""Priority and quotas through the API and the `icd` command: caps, re-prioritising, the jobs list sorted
by priority, quotas that hold and never refuse (docs/scheduling.md). Real database and broker file; the
jobs are claimed with the store's own call, as a worker would."""

from __future__ import annotations

from typing import Any

from click.testing import CliRunner
from fastapi.testclient import TestClient

from store import jobs as q
from store.db import make_engine, session_factory
from store.settings import Settings
from store.tokens import Quota, set_quota
from store.workers import heartbeat
from tests.helpers import tiny_train_spec


def _auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _submit(c: TestClient, secret: str, **extra: Any) -> dict[str, Any]:
    r = c.post("/jobs", json={**tiny_train_spec("j"), **extra}, headers=_auth(secret))
    assert r.status_code == 201, r.text
    return r.json()


def _store(settings: Settings) -> Any:
    engine = make_engine(settings.database_url)
    return engine, session_factory(engine)()


def test_priority_cap_and_reprioritising(public: TestClient, secrets_by_name: dict[str, str]) -> None:
    alice, root = secrets_by_name["alice"], secrets_by_name["root"]
    r = public.post("/jobs", json={**tiny_train_spec("j"), "priority": 5}, headers=_auth(alice))
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "priority"
    assert "set-quota alice --max-priority" in r.json()["detail"][0]["msg"]
    r = public.post("/jobs", json={**tiny_train_spec("j"), "priority": 101}, headers=_auth(root))
    assert r.status_code == 422  # outside the range, even for an admin
    low = _submit(public, alice, priority=-5)
    assert low["priority"] == -5
    assert public.post(f"/jobs/{low['id']}/priority", json={"priority": 1}, headers=_auth(alice)).status_code == 422
    r = public.post(f"/jobs/{low['id']}/priority", json={"priority": 0}, headers=_auth(alice))
    assert r.status_code == 200 and r.json()["priority"] == 0
    bob = secrets_by_name["bob"]
    assert public.post(f"/jobs/{low['id']}/priority", json={"priority": 0}, headers=_auth(bob)).status_code == 404
    r = public.post(f"/jobs/{low['id']}/priority", json={"priority": 50}, headers=_auth(root))
    assert r.status_code == 200 and r.json()["priority"] == 50


def test_sort_by_priority_and_no_reprioritising_a_running_job(
    public: TestClient, secrets_by_name: dict[str, str], settings: Settings
) -> None:
    root = secrets_by_name["root"]
    ids = [_submit(public, root, priority=p)["id"] for p in (0, 7, 0, 3)]
    listed = public.get("/jobs", params={"sort": "priority"}, headers=_auth(root)).json()["items"]
    assert [j["id"] for j in listed] == [ids[1], ids[3], ids[0], ids[2]]
    engine, s = _store(settings)
    try:
        q.claim_job(s, ids[0], "w1")
    finally:
        s.close()
        engine.dispose()
    r = public.post(f"/jobs/{ids[0]}/priority", json={"priority": 9}, headers=_auth(root))
    assert r.status_code == 409 and "running" in r.json()["detail"]


def test_quota_holds_but_never_refuses(public: TestClient, secrets_by_name: dict[str, str], settings: Settings) -> None:
    alice, root = secrets_by_name["alice"], secrets_by_name["root"]
    engine, s = _store(settings)
    try:
        set_quota(s, "alice", Quota(max_running=1))
        jobs = [_submit(public, alice) for _ in range(3)]  # all accepted: 201
        heartbeat(s, "w1", "h", "cpu", "cpu,any", 1, jobs[0]["id"])
        heartbeat(s, "w2", "h", "cpu", "cpu,any", 2, None)
        assert q.claim_next(s, "w1", ["cpu", "any"]).id == jobs[0]["id"]  # type: ignore[union-attr]
        assert q.claim_next(s, "w2", ["cpu", "any"]) is None
    finally:
        s.close()
        engine.dispose()
    page = public.get(f"/jobs/{jobs[1]['id']}", headers=_auth(alice)).json()
    assert page["status"] == "queued"
    assert "max_running=1" in page["status_detail"] and f"job {jobs[0]['id']} on w1" in page["status_detail"]
    quotas = public.get("/quotas", headers=_auth(root)).json()
    row = next(r for r in quotas if r["name"] == "alice")
    assert (row["max_running"], row["running"], row["queued"]) == (1, 1, 2)
    assert [r["name"] for r in public.get("/quotas", headers=_auth(alice)).json()] == ["alice"]


def test_cli_token_quotas_priority_and_sort(
    monkeypatch: Any, public: TestClient, secrets_by_name: dict[str, str], settings: Settings
) -> None:
    from icd_cli.main import main

    monkeypatch.setenv("ICD_DATABASE_URL", settings.database_url)
    runner = CliRunner()
    made = runner.invoke(main, ["token", "create", "--name", "carol", "--max-running", "2", "--max-gpus", "4"])
    assert made.exit_code == 0, made.output
    quota = ["token", "set-quota", "carol", "--max-running", "1", "--max-priority", "3"]
    assert runner.invoke(main, quota).exit_code == 0
    listed = runner.invoke(main, ["token", "list"])
    assert "carol\tuser\tmax_running=1 max_gpus=- max_priority=3" in listed.stdout
    bad = runner.invoke(main, ["token", "set-quota", "carol", "--max-running", "0"])
    assert bad.exit_code == 1 and "max_running must be at least 1" in bad.output
    assert runner.invoke(main, ["token", "set-quota", "nobody"]).exit_code == 1

    root = secrets_by_name["root"]
    first, second = _submit(public, root)["id"], _submit(public, root)["id"]
    # The client commands speak HTTP to the app itself (in this process, through Starlette's test transport).
    import icd_cli.client as client_mod

    real = client_mod.Client.__init__

    def in_process(self: Any, server: str, token: str | None, timeout: float = 30.0) -> None:
        real(self, server, token, timeout)
        self.http = TestClient(public.app, base_url=self.server, headers=dict(self.http.headers))

    monkeypatch.setattr(client_mod.Client, "__init__", in_process)
    out = runner.invoke(main, ["priority", str(second), "9", "--token", root])
    assert out.exit_code == 0, out.output
    assert f"{second}" in out.stdout and "p9" in out.stdout
    out = runner.invoke(main, ["jobs", "--sort", "priority", "--token", root])
    lines = [ln.split()[0] for ln in out.stdout.splitlines()]
    assert out.exit_code == 0 and lines[:2] == [str(second), str(first)]
