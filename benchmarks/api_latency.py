"""API read latency with a big PostgreSQL database (issue 3, performance).

Seeds a fresh PostgreSQL database with 10,000 jobs and 1,000,000 metric points (COPY), starts uvicorn
in a subprocess, and measures p50/p95 of `GET /jobs?limit=50` and `GET /jobs/{id}/metrics?since_step=…`
with httpx over keep-alive connections. Target: p95 <= 25 ms. The database is dropped afterwards.

    .venv/bin/python benchmarks/api_latency.py [--requests 200] [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.docs import TRAIN_EXAMPLE  # noqa: E402
from store.db import upgrade_database  # noqa: E402

TARGET_MS = 25.0
N_JOBS = 10_000
BIG_JOB_SERIES, BIG_JOB_STEPS = 4, 50_000  # one long run: 200k points
SMALL_JOBS, SMALL_SERIES, SMALL_STEPS = 160, 5, 1_000  # 800k points spread over 160 jobs


def admin_connect(url: str | None) -> tuple[psycopg.Connection, str]:
    candidates = [url] if url else [f"postgresql://{u}@127.0.0.1:5432/postgres" for u in ("postgres", "root")]
    last: Exception | None = None
    for c in candidates:
        try:
            return psycopg.connect(c, autocommit=True, connect_timeout=3), c
        except Exception as exc:
            last = exc
    raise SystemExit(f"PostgreSQL unreachable: {last}")


def seed(conn: psycopg.Connection) -> tuple[int, int]:
    """Insert the jobs and metric points; return (big job id, its last step)."""
    spec = json.dumps(TRAIN_EXAMPLE)
    now = datetime.now(UTC)
    statuses = ["succeeded"] * 6 + ["failed", "canceled", "queued", "running"]
    with conn.cursor() as cur:
        with cur.copy(
            "COPY jobs (id, name, kind, status, spec, queue, attempt, depends_on, progress_step, progress_total, "
            "created_at, updated_at, cancel_requested, final_metrics) FROM STDIN"
        ) as copy:
            for i in range(1, N_JOBS + 1):
                t = now - timedelta(seconds=N_JOBS - i)
                st = statuses[i % len(statuses)]
                fm = json.dumps({"AP": 30.0 + i % 10}) if st == "succeeded" else None
                copy.write_row(
                    (
                        i,
                        f"exp-{i % 50}",
                        "train" if i % 3 else "distill",
                        st,
                        spec,
                        "any",
                        1,
                        "[]",
                        300,
                        300,
                        t,
                        t,
                        False,
                        fm,
                    )
                )
        cur.execute("SELECT setval('jobs_id_seq', %s)", (N_JOBS,))
        big = N_JOBS - 5
        with cur.copy("COPY metrics (job_id, name, step, attempt, value) FROM STDIN") as copy:
            for k in range(BIG_JOB_SERIES):
                name = ("loss", "loss_cls", "loss_box", "lr")[k]
                for step in range(1, BIG_JOB_STEPS + 1):
                    copy.write_row((big, name, step, 1, 1.0 / step))
            for j in range(SMALL_JOBS):
                jid = 1 + j * (N_JOBS // SMALL_JOBS)
                for k in range(SMALL_SERIES):
                    name = f"m{k}"
                    for step in range(1, SMALL_STEPS + 1):
                        copy.write_row((jid, name, step, 1, float(step)))
        cur.execute("ANALYZE")
        cur.execute("SELECT count(*) FROM jobs")
        n_jobs = cur.fetchone()[0]  # type: ignore[index]
        cur.execute("SELECT count(*) FROM metrics")
        n_metrics = cur.fetchone()[0]  # type: ignore[index]
    print(f"seeded {n_jobs:,} jobs and {n_metrics:,} metric points")
    return big, BIG_JOB_STEPS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(client: httpx.Client, path: str, n: int) -> list[float]:
    for _ in range(20):  # warm caches and the connection
        client.get(path).raise_for_status()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.get(path)
        out.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
    return out


def report(label: str, ms: list[float]) -> float:
    ms = sorted(ms)
    p50 = statistics.median(ms)
    p95 = ms[int(round(0.95 * (len(ms) - 1)))]
    print(f"{label:<52} p50 {p50:6.2f} ms   p95 {p95:6.2f} ms   p95/target {p95 / TARGET_MS:5.2f}")
    return p95


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--admin-url", default=None, help="libpq URL of a maintenance database (default: postgres@local)")
    args = ap.parse_args()

    admin, admin_url = admin_connect(args.admin_url)
    name = f"icd_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    url = f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1)
    proc = None
    try:
        upgrade_database(url)
        t0 = time.perf_counter()
        with psycopg.connect(f"{base}/{name}") as conn:
            big, last = seed(conn)
        print(f"seeding took {time.perf_counter() - t0:.1f} s")

        port = free_port()
        home = tempfile.mkdtemp(prefix="icd-bench-")
        env = {**os.environ, "ICD_HOME": home, "ICD_DATABASE_URL": url, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
        )
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=10) as client:
            for _ in range(200):
                try:
                    if client.get("/version").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise SystemExit("uvicorn did not start")
            n = args.requests
            print(
                f"\n{n} requests each, uvicorn (1 process) + PostgreSQL, keep-alive httpx client; target p95 <= "
                f"{TARGET_MS:.0f} ms"
            )
            p_list = report("GET /jobs?limit=50", measure(client, "/jobs?limit=50", n))
            report("GET /jobs?limit=50&status=running", measure(client, "/jobs?limit=50&status=running", n))
            p_metrics = report(
                f"GET /jobs/{big}/metrics?since_step={last - 100} (4 series)",
                measure(client, f"/jobs/{big}/metrics?since_step={last - 100}", n),
            )
            report(
                f"GET /jobs/{big}/metrics?max_points=500 (200k pts)",
                measure(client, f"/jobs/{big}/metrics?max_points=500", max(20, n // 10)),
            )
            ok = p_list <= TARGET_MS and p_metrics <= TARGET_MS
            print(f"\nverdict: {'PASS' if ok else 'FAIL'} (p95 of the two target endpoints vs {TARGET_MS:.0f} ms)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


if __name__ == "__main__":
    main()
