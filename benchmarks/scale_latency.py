"""GET /jobs and GET /jobs/{id}/metrics latency as the database grows to 1M jobs and ~100M metric points.

Everything is generated server-side (INSERT ... SELECT generate_series) in a fresh PostgreSQL database.
The jobs table grows through --jobs (default 1k, 10k, 100k, 1M); at each size the API (`icd serve
--no-worker`, 1 process) is measured with sequential keep-alive requests:
  - GET /jobs?limit=50, cursor pages (following next_cursor, from the top and from the middle),
    status / name filters, and a deep offset page for contrast;
  - GET /jobs/{big}/metrics: max_points=1000 over one 1M-point series and over four of them, since_step.
Then the bulk metric points are added (--points in all) and everything is measured again; the table
sizes give the bytes per point. Targets (issue 14): list and cursor p95 <= 25 ms and <= 1.5x the 10k
figure; max_points=1000 over 1M points p95 <= 50 ms. Build once and keep with --keep NAME; a later run
with the same --keep NAME measures the kept database without rebuilding.

    .venv/bin/python benchmarks/scale_latency.py --points 100000000 --requests 200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import api_server, percentile, scratch_database  # noqa: E402
from store.db import upgrade_database  # noqa: E402
from store.models import ROLLUP_BLOCK_STEPS  # noqa: E402
from store.paging import encode_cursor  # noqa: E402

TARGET_LIST_MS, TARGET_METRICS_MS = 25.0, 50.0
# The generated queued jobs wait on a queue no worker consumes (the API runs with --no-worker): without
# this the API's reaper would fail them all in the middle of the measurement. It still runs its passes
# every 2 s (their cost is part of what is measured); they find what a healthy service's find.
STEADY_STATE = {"ICD_UNSERVABLE_TIMEOUT_S": "1e9"}
BIG_JOB, BIG_STEPS, BIG_SERIES = 500, 1_000_000, ("loss", "loss_cls", "loss_box", "lr")
BULK_SERIES, BULK_STEPS = 5, 2_000  # each bulk job: 5 series x 2,000 steps = 10k points
SPEC = json.dumps(
    {
        "kind": "train",
        "name": "bench",
        "model": {"arch": "retinanet", "backbone": "resnet18"},
        "data": {"train": {"format": "shapes", "n_images": 512}},
        "iterations": 2000,
    }
)

JOBS_SQL = """
INSERT INTO jobs (id, name, kind, status, spec, queue, attempt, depends_on, progress_step, progress_total,
                  created_at, updated_at, cancel_requested, final_metrics, worker, lease_expires_at)
SELECT g, 'exp-' || mod(g, 50), (ARRAY['train', 'distill', 'evaluate'])[1 + mod(g, 3)],
       (ARRAY['succeeded', 'succeeded', 'succeeded', 'succeeded', 'succeeded', 'succeeded', 'failed',
              'canceled', 'queued', 'running'])[1 + mod(g, 10)],
       %(spec)s::json, 'any', 1, '[]', 2000, 2000, now() - make_interval(secs => %(n)s::int - g),
       now() - make_interval(secs => %(n)s::int - g), false,
       CASE WHEN mod(g, 10) < 6 THEN json_build_object('AP', 30 + mod(g, 10)) END,
       CASE WHEN mod(g, 10) = 9 THEN 'bench-worker' END,
       CASE WHEN mod(g, 10) = 9 THEN now() + interval '100 years' END  -- running: a held lease
FROM generate_series(%(lo)s::int, %(n)s::int) AS g
"""

BIG_SQL = """
INSERT INTO metrics (job_id, name, step, attempt, value)
SELECT %(job)s::int, %(name)s, st, 1, 1.0 / st + random() * 0.01 FROM generate_series(%(lo)s::int, %(hi)s::int) AS st
"""

BULK_SQL = f"""
INSERT INTO metrics (job_id, name, step, attempt, value)
SELECT j, 'm' || k, st, 1, random()
FROM generate_series(%(lo)s::int, %(hi)s::int) AS j, generate_series(0, {BULK_SERIES - 1}) AS k,
     generate_series(1, {BULK_STEPS}) AS st
"""


# The rollup rows store.rollups keeps (count, min, max, last point per block), with PostgreSQL array
# aggregates: one hash aggregation, ~3x faster for bulk loads than the portable window-function form.
# Ties go to the earliest step, as there.
ROLLUP_SQL = f"""
INSERT INTO metric_rollups (job_id, name, block, n, min_step, min_value, max_step, max_value, last_step, last_value)
SELECT job_id, name, step / {ROLLUP_BLOCK_STEPS}, count(*),
       (min(ARRAY[value, step]))[2]::int, (min(ARRAY[value, step]))[1],
       (-(max(ARRAY[value, -step]))[2])::int, (max(ARRAY[value, -step]))[1],
       (max(ARRAY[step, value]))[1]::int, (max(ARRAY[step, value]))[2]
FROM metrics WHERE job_id BETWEEN %(lo)s AND %(hi)s GROUP BY job_id, name, step / {ROLLUP_BLOCK_STEPS}
"""


def grow_jobs(conn: psycopg.Connection, have: int, want: int) -> None:
    t0 = time.perf_counter()
    for lo in range(have + 1, want + 1, 100_000):
        conn.execute(JOBS_SQL, {"spec": SPEC, "lo": lo, "n": min(want, lo + 99_999)})
        conn.commit()
    conn.execute("SELECT setval('jobs_id_seq', %s)", (want,))
    conn.commit()
    print(f"  jobs {have:,} -> {want:,} in {time.perf_counter() - t0:.0f} s", flush=True)


def add_big_series(conn: psycopg.Connection) -> None:
    t0 = time.perf_counter()
    for name in BIG_SERIES:
        for lo in range(1, BIG_STEPS + 1, 250_000):
            conn.execute(BIG_SQL, {"job": BIG_JOB, "name": name, "lo": lo, "hi": lo + 249_999})
            conn.commit()
    conn.execute(ROLLUP_SQL, {"lo": BIG_JOB, "hi": BIG_JOB})
    conn.commit()
    print(
        f"  {len(BIG_SERIES)} x {BIG_STEPS:,} points for job {BIG_JOB} in {time.perf_counter() - t0:.0f} s", flush=True
    )


def add_bulk_points(conn: psycopg.Connection, n_points: int, first_job: int) -> int:
    """Add ~n_points over jobs first_job.. in chunks of 200 jobs (2M points); returns the points added.

    Seeding, not a measurement of ingestion (that is benchmarks/ingest_load.py): the metrics table's
    indexes and constraints are dropped for the load and rebuilt after it, and the rollups are computed
    in one pass at the end, as a bulk import into PostgreSQL is done. Each phase's time is printed.
    """
    per_job = BULK_SERIES * BULK_STEPS
    n_jobs = n_points // per_job
    saved = drop_metrics_indexes(conn)
    t0, done = time.perf_counter(), 0
    for lo in range(first_job, first_job + n_jobs, 200):
        hi = min(first_job + n_jobs - 1, lo + 199)
        conn.execute(BULK_SQL, {"lo": lo, "hi": hi})
        conn.commit()
        done += (hi - lo + 1) * per_job
        rate = done / (time.perf_counter() - t0)
        print(f"  bulk points {done:,} / {n_jobs * per_job:,} ({rate:,.0f} points/s)", flush=True)
    t1 = time.perf_counter()
    conn.execute("SET maintenance_work_mem = '2GB'")  # this session only: sort 100M keys in memory
    conn.execute("SET work_mem = '256MB'")
    for ddl in saved:
        conn.execute(ddl)
        conn.commit()
    print(f"  indexes and constraints rebuilt in {time.perf_counter() - t1:.0f} s", flush=True)
    t1 = time.perf_counter()
    for lo in range(first_job, first_job + n_jobs, 10_000):
        conn.execute(ROLLUP_SQL, {"lo": lo, "hi": min(first_job + n_jobs - 1, lo + 9_999)})
        conn.commit()
    print(f"  rollups computed in {time.perf_counter() - t1:.0f} s", flush=True)
    return done


def drop_metrics_indexes(conn: psycopg.Connection) -> list[str]:
    """Drop the metrics table's constraints and indexes; return the DDL that recreates them, in order."""
    constraints = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'metrics'::regclass "
        "ORDER BY contype = 'f'"  # the primary key before the foreign key
    ).fetchall()
    indexes = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'metrics' AND indexname NOT IN "
        "(SELECT conname FROM pg_constraint WHERE conrelid = 'metrics'::regclass)"
    ).fetchall()
    for name, _ in constraints:
        conn.execute(f'ALTER TABLE metrics DROP CONSTRAINT "{name}"')
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    conn.commit()
    return [f'ALTER TABLE metrics ADD CONSTRAINT "{n}" {d}' for n, d in constraints] + [d for _, d in indexes]


def vacuum(libpq_url: str) -> None:
    with psycopg.connect(libpq_url, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")


def timed(client: httpx.Client, path: str) -> tuple[float, Any]:
    t0 = time.perf_counter()
    r = client.get(path)
    ms = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    return ms, r.json()


def sample(client: httpx.Client, path: str, n: int) -> list[float]:
    for _ in range(5):
        timed(client, path)
    return [timed(client, path)[0] for _ in range(n)]


def cursor_walk(client: httpx.Client, n: int, start: str | None) -> list[float]:
    """n pages in a row, each from the previous page's next_cursor (a user scrolling)."""
    out, cursor = [], start
    for _ in range(n + 5):
        ms, page = timed(client, "/jobs?limit=50" + (f"&cursor={cursor}" if cursor else ""))
        out.append(ms)
        cursor = page["next_cursor"]
    return out[5:]


def measure(base: str, n_jobs: int, n: int) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    with httpx.Client(base_url=base, timeout=60) as c:
        big = f"/jobs/{BIG_JOB}/metrics"
        cases: dict[str, list[float]] = {
            "GET /jobs?limit=50": sample(c, "/jobs?limit=50", n),
            "GET /jobs?limit=50 cursor pages from the top": cursor_walk(c, n, None),
            "GET /jobs?limit=50 cursor pages from the middle": cursor_walk(c, n, encode_cursor(n_jobs // 2)),
            "GET /jobs?limit=50&status=running": sample(c, "/jobs?limit=50&status=running", n),
            "GET /jobs?limit=50&status=queued,running": sample(c, "/jobs?limit=50&status=queued,running", n),
            "GET /jobs?limit=50&name=exp-7": sample(c, "/jobs?limit=50&name=exp-7", n),
            f"GET /jobs?limit=50&offset={n_jobs // 2} (contrast)": sample(
                c, f"/jobs?limit=50&offset={n_jobs // 2}", max(10, n // 10)
            ),
            "metrics?names=loss&max_points=1000 (1 x 1M points)": sample(c, f"{big}?names=loss&max_points=1000", n),
            "metrics?max_points=1000 (4 x 1M points)": sample(c, f"{big}?max_points=1000", max(20, n // 4)),
            f"metrics?since_step={BIG_STEPS - 100} (4 series)": sample(c, f"{big}?since_step={BIG_STEPS - 100}", n),
        }
        page = c.get("/jobs?limit=50").json()
    print(f"  total={page['total']:,} (estimate: {page['total_is_estimate']})")
    for label, ms in cases.items():
        rows[label] = {"p50": statistics.median(ms), "p95": percentile(ms, 95), "p99": percentile(ms, 99)}
        print(
            f"  {label:<56} p50 {rows[label]['p50']:7.2f}   p95 {rows[label]['p95']:7.2f}   "
            f"p99 {rows[label]['p99']:7.2f} ms",
            flush=True,
        )
    return rows


def table_bytes(libpq_url: str) -> dict[str, int]:
    with psycopg.connect(libpq_url) as c:
        out = {
            t: c.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]  # type: ignore[index]
            for t in ("jobs", "metrics", "metric_rollups")
        }
        out["points"] = c.execute("SELECT count(*) FROM metrics").fetchone()[0]  # type: ignore[index]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="1000,10000,100000,1000000", help="job counts to measure at, ascending")
    ap.add_argument("--points", type=int, default=100_000_000, help="metric points in all at the end")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--admin-url", default=None)
    ap.add_argument("--keep", default=None, help="build into (or reuse) this database and keep it")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()
    sizes = [int(x) for x in args.jobs.split(",")]
    results: dict[str, Any] = {"curve": {}, "args": vars(args) | {"json": str(args.json)}}
    with scratch_database(args.admin_url, "icd_scale", args.keep) as (url, libpq):
        upgrade_database(url)
        with psycopg.connect(libpq) as conn:
            have = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]  # type: ignore[index]
            built = have >= sizes[-1]
            if not built:
                print("building", flush=True)
                if have == 0:
                    grow_jobs(conn, 0, sizes[0])
                    add_big_series(conn)
                    have = sizes[0]
        for size in sizes if not built else []:
            with psycopg.connect(libpq) as conn:
                if size > have:
                    grow_jobs(conn, have, size)
                    have = size
            vacuum(libpq)
            print(f"\n{size:,} jobs, {table_bytes(libpq)['points']:,} points", flush=True)
            with api_server(url, extra_env=STEADY_STATE) as base:
                results["curve"][str(size)] = measure(base, size, args.requests)
        with psycopg.connect(libpq) as conn:
            points = conn.execute("SELECT count(*) FROM metrics").fetchone()[0]  # type: ignore[index]
            if points < args.points:
                t0 = time.perf_counter()
                add_bulk_points(conn, args.points - points, BIG_JOB + 1)
                results["bulk_load_s"] = time.perf_counter() - t0
        vacuum(libpq)
        sizes_now = table_bytes(libpq)
        results["bytes"] = sizes_now
        gib = sizes_now["metrics"] / 2**30
        rollup_gib = sizes_now["metric_rollups"] / 2**30
        print(
            f"\nfinal: {sizes[-1]:,} jobs, {sizes_now['points']:,} points; metrics {gib:.2f} GiB + rollups "
            f"{rollup_gib:.2f} GiB = "
            f"{(sizes_now['metrics'] + sizes_now['metric_rollups']) / sizes_now['points']:.1f} bytes/point"
        )
        with api_server(url, extra_env=STEADY_STATE) as base:
            results["final"] = measure(base, sizes[-1], args.requests)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    final, ten_k = results["final"], results["curve"].get("10000")
    ok_list = final["GET /jobs?limit=50"]["p95"] <= TARGET_LIST_MS
    ok_cursor = final["GET /jobs?limit=50 cursor pages from the middle"]["p95"] <= TARGET_LIST_MS
    ok_metrics = final["metrics?names=loss&max_points=1000 (1 x 1M points)"]["p95"] <= TARGET_METRICS_MS
    print(
        f"\nlist p95 {final['GET /jobs?limit=50']['p95']:.1f} ms (<= {TARGET_LIST_MS:.0f}: {ok_list}), "
        f"cursor p95 (<= {TARGET_LIST_MS:.0f}: {ok_cursor}), metrics 1M p95 "
        f"{final['metrics?names=loss&max_points=1000 (1 x 1M points)']['p95']:.1f} ms "
        f"(<= {TARGET_METRICS_MS:.0f}: {ok_metrics})"
    )
    if ten_k:
        ratio = final["GET /jobs?limit=50"]["p95"] / ten_k["GET /jobs?limit=50"]["p95"]
        print(f"list p95 at {sizes[-1]:,} jobs / at 10,000 jobs: {ratio:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
