"""HTTP load test with locust (headless, bounded users and time, loopback only).

Seeds a fresh PostgreSQL database server-side (--jobs jobs; 5 series x 2,000 points on --metric-jobs of
them; one 1M-point series), starts `icd serve --no-worker --workers N` with a Redis broker (your own DB
number: submitted jobs are real broker messages, removed afterwards), runs benchmarks/locustfile.py and
prints throughput and p50/p95/p99 per endpoint from locust's CSV. The database is dropped afterwards.

    .venv/bin/python benchmarks/load_test.py --users 20 --time 60 --api-procs 2 --broker redis://127.0.0.1:6379/14
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import ROOT, api_server, scratch_database  # noqa: E402
from benchmarks.scale_latency import BIG_JOB, BULK_SQL, JOBS_SQL, ROLLUP_SQL, SPEC, STEADY_STATE  # noqa: E402
from store.db import upgrade_database  # noqa: E402

BIG_SERIES_SQL = """
INSERT INTO metrics (job_id, name, step, attempt, value)
SELECT %(job)s::int, 'loss', st, 1, 1.0 / st + random() * 0.01 FROM generate_series(1, 1000000) AS st
"""


def seed(libpq: str, n_jobs: int, metric_jobs: int) -> None:
    with psycopg.connect(libpq) as c:
        c.execute(JOBS_SQL, {"spec": SPEC, "lo": 1, "n": n_jobs})
        c.execute("SELECT setval('jobs_id_seq', %s)", (n_jobs,))
        c.execute(BIG_SERIES_SQL, {"job": BIG_JOB})
        c.execute(BULK_SQL, {"lo": BIG_JOB + 1, "hi": BIG_JOB + metric_jobs})
        c.execute(ROLLUP_SQL, {"lo": BIG_JOB, "hi": BIG_JOB + metric_jobs})
        c.commit()
    with psycopg.connect(libpq, autocommit=True) as c:
        c.execute("VACUUM ANALYZE")


def clear_broker(broker: str) -> None:
    """Remove the messages the submits left (only this benchmark's queues, in its own Redis database)."""
    import redis

    r = redis.Redis.from_url(broker)
    for key in ("any", "cpu", "cuda"):
        r.delete(key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--spawn-rate", type=float, default=10)
    ap.add_argument("--time", default="60s", help="locust --run-time, e.g. 60s")
    ap.add_argument("--api-procs", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--metric-jobs", type=int, default=100)
    ap.add_argument("--broker", required=True, help="redis://127.0.0.1:6379/<your db number>")
    ap.add_argument("--admin-url", default=None)
    args = ap.parse_args()
    with scratch_database(args.admin_url, "icd_load") as (url, libpq):
        upgrade_database(url)
        seed(libpq, args.jobs, args.metric_jobs)
        print(f"seeded {args.jobs:,} jobs, {args.metric_jobs * 10_000 + 1_000_000:,} metric points", flush=True)
        out = Path(tempfile.mkdtemp(prefix="icd-locust-")) / "run"
        try:
            with api_server(
                url, workers=args.api_procs, extra_env={**STEADY_STATE, "ICD_BROKER_URL": args.broker}
            ) as base:
                ids = ",".join(str(BIG_JOB + 1 + i) for i in range(args.metric_jobs))
                env = {**os.environ, "ICD_LOAD_JOB_IDS": ids, "ICD_LOAD_BIG_JOB": str(BIG_JOB)}
                cmd = [
                    str(Path(sys.executable).with_name("locust")),
                    "-f",
                    str(ROOT / "benchmarks" / "locustfile.py"),
                    "--headless",
                    "--host",
                    base,
                    "-u",
                    str(args.users),
                    "-r",
                    str(args.spawn_rate),
                    "--run-time",
                    args.time,
                    "--csv",
                    str(out),
                    "--only-summary",
                    "--loglevel",
                    "WARNING",
                ]
                with open(f"{out}.log", "w") as log:
                    subprocess.run(cmd, check=False, env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:
            clear_broker(args.broker)
    print(f"locust log and CSV files: {out}*")
    with open(f"{out}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    print(f"\nlocust: {args.users} users, {args.time}, {args.api_procs} API processes (uvicorn workers)")
    print(f"{'endpoint':<52} {'requests':>8} {'fail':>5} {'req/s':>7} {'p50':>6} {'p95':>6} {'p99':>6} ms")
    for r in rows:
        print(
            f"{r['Name'] if r['Name'] != 'Aggregated' else 'all':<52} {r['Request Count']:>8} "
            f"{r['Failure Count']:>5} {float(r['Requests/s']):7.1f} {r['50%']:>6} {r['95%']:>6} {r['99%']:>6}"
        )


if __name__ == "__main__":
    main()
