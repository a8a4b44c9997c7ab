"""GET /jobs at scale: keyset cursors, a bounded total, and an index behind every filter (EXPLAIN)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, text

from store import jobs as q
from store import paging
from store.db import make_engine, session_factory
from store.settings import Settings


def _add_jobs(settings: Settings, n: int, name: str = "j") -> list[int]:
    engine = make_engine(settings.database_url)
    try:
        with session_factory(engine)() as s:
            return [q.create_job(s, {"kind": "train"}, "train", name, "any").id for _ in range(n)]
    finally:
        engine.dispose()


def test_cursor_pages_return_every_job_once_while_jobs_are_inserted(client: TestClient, settings: Settings) -> None:
    before = set(_add_jobs(settings, 57))
    stop, inserted = threading.Event(), []

    def keep_inserting() -> None:
        while not stop.is_set():
            inserted.extend(_add_jobs(settings, 1, name="new"))

    writer = threading.Thread(target=keep_inserting)
    writer.start()
    try:
        seen: list[int] = []
        page = client.get("/jobs", params={"limit": 10}).json()
        newest = page["items"][0]["id"]
        pages = 1
        while True:
            seen += [j["id"] for j in page["items"]]
            if page["next_cursor"] is None:
                break
            page = client.get("/jobs", params={"limit": 10, "cursor": page["next_cursor"]}).json()
            pages += 1
    finally:
        stop.set()
        writer.join()
    assert inserted, "jobs were inserted while paging"
    assert len(seen) == len(set(seen)), "a job appeared twice"
    assert seen == sorted(seen, reverse=True)
    assert set(seen) == {i for i in before | set(inserted) if i <= newest}  # every job once, none skipped
    assert before <= set(seen) and pages >= 6


def test_cursor_and_offset_errors_name_the_field(client: TestClient, settings: Settings) -> None:
    _add_jobs(settings, 3)
    page = client.get("/jobs", params={"limit": 2}).json()
    assert page["total"] == 3 and page["total_is_estimate"] is False and page["next_cursor"]
    last = client.get("/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    assert len(last["items"]) == 1 and last["next_cursor"] is None
    for bad in ("nonsense", "eyJiZWZvcmUiOiAieCJ9", paging.encode_cursor(5)[:-3]):
        r = client.get("/jobs", params={"cursor": bad})
        detail = r.json()["detail"]  # a 422 is always the array shape, naming the field
        assert r.status_code == 422 and detail[0]["field"] == "cursor" and detail[0]["msg"].startswith("cursor:"), bad
    r = client.get("/jobs", params={"cursor": page["next_cursor"], "offset": 2})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "offset"
    assert r.json()["detail"][0]["msg"].startswith("offset:")


@pytest.mark.postgres
def test_total_is_estimated_above_the_exact_limit(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.service.conftest import _truncate

    _truncate(pg_url)
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(_BULK_JOBS), {"n": 3_000})
            conn.execute(text("ANALYZE jobs"))
        with session_factory(engine)() as s:
            assert paging.count_total(s, status="running") == (300, False)
            monkeypatch.setattr(paging, "EXACT_TOTAL_LIMIT", 100)
            total, estimated = paging.count_total(s, status="running")
            assert estimated and 150 <= total <= 600  # the planner's estimate of 300
            assert paging.count_total(s, name="exp-7") == (60, False)
    finally:
        engine.dispose()


# 10 statuses cycle, 3 kinds, 50 names, one parent per 100 jobs: every filter of GET /jobs is selective.
_BULK_JOBS = """
INSERT INTO jobs (name, kind, status, spec, queue, attempt, parent_id, depends_on, progress_step,
                  created_at, updated_at, cancel_requested)
SELECT 'exp-' || (g % 50),
       (ARRAY['train', 'distill', 'evaluate'])[1 + g % 3],
       (ARRAY['succeeded', 'succeeded', 'succeeded', 'succeeded', 'succeeded', 'succeeded', 'failed',
              'canceled', 'queued', 'running'])[1 + g % 10],
       '{}', 'any', 1, NULL, '[]', 0, now(), now(), false
FROM generate_series(1, :n) AS g
"""


@pytest.mark.postgres
def test_every_list_filter_is_served_by_an_index(pg_url: str) -> None:
    from tests.service.conftest import _truncate

    _truncate(pg_url)
    engine = make_engine(pg_url)
    try:
        with engine.begin() as conn:
            conn.execute(text(_BULK_JOBS), {"n": 60_000})
            conn.execute(text("UPDATE jobs SET parent_id = 1 + (id / 100) * 100 WHERE id % 100 <> 0 AND id > 100"))
            conn.execute(text("UPDATE jobs SET lease_expires_at = now() + interval '1 day' WHERE status = 'running'"))
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE jobs"))  # what autovacuum keeps true of a big table
        cursor = paging.encode_cursor(30_000)
        cases: list[dict[str, Any]] = [
            {},
            {"status": "running"},
            {"status": ["queued", "running"]},
            {"kind": "evaluate"},
            {"name": "exp-7"},
            {"parent_id": 501},
            {"status": "failed", "kind": "train"},
            {"cursor": cursor},
            {"status": "running", "cursor": cursor},
            {"name": "exp-7", "cursor": cursor},
            {"search": "xp-7"},  # free text: the name contains it (a trigram index on PostgreSQL)
            {"search": "xp-7", "cursor": cursor},
        ]
        statements: list[tuple[str, Any]] = []

        def capture(_conn: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, _many: bool) -> None:
            if statement.lstrip().upper().startswith("SELECT"):
                statements.append((statement, parameters))

        event.listen(engine, "before_cursor_execute", capture)
        with session_factory(engine)() as s:
            for case in cases:
                statements.clear()
                page = paging.page_jobs(s, limit=50, **case)
                assert page.items, case
                event.remove(engine, "before_cursor_execute", capture)
                with engine.connect() as conn:
                    for sql, params in statements:
                        plan = "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}", params))
                        if "WHERE" not in sql:  # unfiltered: any LIMITed read is bounded work
                            assert "Limit" in plan, f"{case}: {sql}\n{plan}"
                            continue
                        assert "Seq Scan" not in plan, f"{case}: {sql}\n{plan}"
                        assert "Index" in plan, f"{case}: {sql}\n{plan}"
                event.listen(engine, "before_cursor_execute", capture)
            # The reaper's scans run every 2 s in the API and in every worker: indexed too.
            statements.clear()
            q.reap_expired_leases(s)
            q.fail_unservable(s, ["cpu", "any"], wait_s=600)
            s.rollback()
        event.remove(engine, "before_cursor_execute", capture)
        reaper_sql = [(sql, params) for sql, params in statements if "FROM jobs" in sql]
        assert len(reaper_sql) >= 2, statements
        with engine.connect() as conn:
            for sql, params in reaper_sql:
                plan = "\n".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {sql}", params))
                assert "Seq Scan" not in plan and "Index" in plan, f"reaper: {sql}\n{plan}"
    finally:
        engine.dispose()
