"""A database outage at submit is a 503 with Retry-After (as a broker outage is), never a bare 500, and
the API answers again, with nothing half-recorded, once the database is back (issue 23, item 4)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.docs import TRAIN_EXAMPLE
from api.main import create_app
from store.settings import Settings
from tests.helpers import TcpRelay


@pytest.mark.postgres
def test_submit_during_a_postgres_outage_is_503_with_retry_after(pg_url: str, tmp_path: Path) -> None:
    host_port = pg_url.split("@", 1)[1].split("/", 1)[0]
    port = int(host_port.rsplit(":", 1)[1]) if ":" in host_port else 5432
    relay = TcpRelay(port)
    url = pg_url.replace(f"@{host_port}/", f"@127.0.0.1:{relay.port}/")
    (tmp_path / "data").mkdir()
    settings = Settings(
        home=tmp_path / "home",
        database_url=url,
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
        data_roots=[tmp_path / "data"],
        reaper_interval_s=0,
    )
    app = create_app(settings)
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            before = client.get("/jobs").json()["total"]  # the session's database is shared with other tests
            assert client.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE)).status_code == 201
            relay.cut()
            for _ in range(3):  # the pooled connection is gone, then new ones are refused
                r = client.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE))
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"] == "5" and "database is unavailable" in r.json()["detail"]
                assert client.get("/jobs").status_code == 503
            relay.restore()
            assert client.post("/jobs", json=copy.deepcopy(TRAIN_EXAMPLE)).status_code == 201
            assert client.get("/jobs").json()["total"] == before + 2
    finally:
        app.state.engine.dispose()
        relay.close()
