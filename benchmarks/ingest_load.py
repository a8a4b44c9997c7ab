"""Ingestion under load: simulated workers report metrics through the real DbReporter while clients read.

Each simulated worker is what a training worker runs: a loop calling `DbReporter.on_metrics` at
--steps-per-s with --series scalars per step (and `should_stop()` every step), whose writer thread
flushes one batched upsert (metrics + rollups + progress) per --flush-s and reads the cancel flag.
--workers of them run in --procs processes against a fresh PostgreSQL database, for --duration seconds,
while --readers HTTP clients poll `icd serve --workers --api-procs` (GET /jobs?limit=50,
metrics?since_step, metrics?max_points=1000). Reported: stored points/s (overall and the slowest 5 s
window), read p50/p95/p99 per endpoint during ingestion, lost and duplicated points (every sent
(job, name, step) is checked), rollup counts vs rows, and database bytes per point. Target: >= 20k
points/s with read p95 <= 50 ms.

    .venv/bin/python benchmarks/ingest_load.py --workers 100 --steps-per-s 10 --series 20 --duration 180
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import api_server, percentile, scratch_database  # noqa: E402


def run_workers(url: str, job_ids: list[int], args: dict[str, Any], start_at: float, out: Any) -> None:
    """One process: a DbReporter and a 'training loop' thread per job, until the deadline."""
    from store.artifacts import ArtifactStore
    from store.db import make_engine, session_factory
    from worker.reporter import DbReporter

    if args["worker_nice"]:
        # The simulated workers stand in for training machines elsewhere: niced, their Python gets the CPU
        # the API and PostgreSQL leave, instead of taking it from the reads being measured.
        os.nice(args["worker_nice"])
    # Workers share a few connections per process (as behind pgbouncer): 100 workers with a connection
    # each would exceed a default max_connections of 100.
    engine = make_engine(url, pool_size=args["pool"], max_overflow=0, pool_timeout=60)
    sessions = session_factory(engine)
    artifacts = ArtifactStore(Path(args["home"]) / "artifacts")
    sent: dict[int, int] = {}

    def train(job_id: int) -> None:
        rep = DbReporter(
            sessions,
            job_id,
            1,
            artifacts,
            flush_every=10**9,
            flush_interval_s=args["flush_s"],
            cancel_check_s=1.0,
            background=True,
        )
        rng = random.Random(job_id)
        names = [f"loss_{i}" for i in range(args["series"])]
        total = int(args["duration"] * args["steps_per_s"])
        time.sleep(max(0.0, start_at - time.time()) + rng.random() * args["flush_s"])  # workers out of phase
        rep.on_start(0, total)
        t0, step = time.monotonic(), 0
        while step < total:
            step += 1
            rep.on_metrics(step, {n: rng.random() for n in names})
            rep.should_stop()
            lag = t0 + step / args["steps_per_s"] - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        rep.on_end(step, {})
        sent[job_id] = step

    threads = [threading.Thread(target=train, args=(j,)) for j in job_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.dispose()
    out.put(sent)


def read_loop(
    base: str, job_ids: list[int], stop: threading.Event, lat: dict[str, list[float]], every_s: float = 0.0
) -> None:
    """One client: the list, a job's new points and its downsampled curve, again and again -- back to back
    (every_s=0: a saturating client), or starting a round every `every_s` seconds (a dashboard polling)."""
    rng = random.Random()
    with httpx.Client(base_url=base, timeout=30) as c:
        next_round = time.monotonic() + rng.random() * every_s
        while not stop.is_set():
            if every_s:
                stop.wait(max(0.0, next_round - time.monotonic()))
                next_round += every_s
                if stop.is_set():
                    break
            job = rng.choice(job_ids)
            for label, path in (
                ("GET /jobs?limit=50", "/jobs?limit=50"),
                ("GET /jobs/{id}/metrics?since_step=<last-20>", None),
                ("GET /jobs/{id}/metrics?max_points=1000", f"/jobs/{job}/metrics?max_points=1000"),
            ):
                if path is None:
                    try:
                        last = c.get(f"/jobs/{job}").json()["progress_step"]
                    except (httpx.HTTPError, ValueError, KeyError):
                        last = 0
                    path = f"/jobs/{job}/metrics?since_step={max(0, last - 20)}"
                t0 = time.perf_counter()
                try:
                    ok = c.get(path).status_code == 200
                except httpx.HTTPError:
                    ok = False
                lat.setdefault(label if ok else f"{label} FAILED", []).append((time.perf_counter() - t0) * 1000)


def stored_points(libpq: str) -> int:
    for attempt in range(10):
        try:
            with psycopg.connect(libpq) as c:
                return int(c.execute("SELECT coalesce(sum(n), 0) FROM metric_rollups").fetchone()[0])  # type: ignore[index]
        except psycopg.OperationalError:
            time.sleep(0.5 * (attempt + 1))
    raise SystemExit("cannot reach the database to count points")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=100)
    ap.add_argument("--procs", type=int, default=4, help="processes the simulated workers are spread over")
    ap.add_argument("--steps-per-s", type=float, default=10.0)
    ap.add_argument("--series", type=int, default=20)
    ap.add_argument("--flush-s", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=180.0)
    ap.add_argument("--readers", type=int, default=4)
    ap.add_argument("--read-every", type=float, default=0.0, help="s between a reader's rounds (0: back to back)")
    ap.add_argument("--pool", type=int, default=6, help="database connections per writer process")
    ap.add_argument("--api-procs", type=int, default=2)
    ap.add_argument(
        "--worker-nice", type=int, default=0, help="nice level of the simulated workers (19: remote machines' share)"
    )
    ap.add_argument("--admin-url", default=None)
    args = ap.parse_args()
    rate = args.workers * args.steps_per_s * args.series
    print(
        f"{args.workers} workers x {args.steps_per_s:g} steps/s x {args.series} series = {rate:,.0f} points/s "
        f"offered, flush every {args.flush_s:g} s, {args.duration:g} s; {args.readers} readers "
        f"({'back to back' if not args.read_every else f'a round every {args.read_every:g} s'}) on "
        f"{args.api_procs} API processes; simulated workers at nice {args.worker_nice}",
        flush=True,
    )

    from store.db import make_engine, session_factory, upgrade_database
    from store.jobs import claim_job, create_job

    with scratch_database(args.admin_url, "icd_ingest") as (url, libpq):
        upgrade_database(url)
        engine = make_engine(url)
        with session_factory(engine)() as s:
            job_ids = []
            for i in range(args.workers):
                jid = create_job(s, {"kind": "train"}, "train", f"load-{i}", "any").id
                # A lease for the whole run: a real worker's heartbeat renews it, the simulation has none,
                # and the API's reaper must not take the jobs back mid-run.
                claim_job(s, jid, f"sim{i}@bench", lease_s=args.duration + 600)
                job_ids.append(jid)
        engine.dispose()
        home = Path(f"/tmp/icd-ingest-{job_ids[0]}-{time.time_ns()}")
        cfg = {**vars(args), "home": str(home)}
        with api_server(url, workers=args.api_procs) as base:
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            start_at = time.time() + 5.0  # every process imported and connected
            chunks = [job_ids[i :: args.procs] for i in range(args.procs)]
            procs = [ctx.Process(target=run_workers, args=(url, ch, cfg, start_at, out)) for ch in chunks]
            for p in procs:
                p.start()
            time.sleep(max(0.0, start_at - time.time()) + args.flush_s + 1)
            stop, lat = threading.Event(), {}
            readers = [
                threading.Thread(target=read_loop, args=(base, job_ids, stop, lat, args.read_every))
                for _ in range(args.readers)
            ]
            for r in readers:
                r.start()
            windows: list[tuple[float, int]] = [(time.monotonic(), stored_points(libpq))]
            while any(p.is_alive() for p in procs) and len(windows) * 5 < args.duration + 60:
                time.sleep(5)
                windows.append((time.monotonic(), stored_points(libpq)))
                if windows[-1][0] - windows[0][0] > args.duration - 2:
                    stop.set()  # read only while every worker still writes
            stop.set()
            for r in readers:
                r.join()
            sent: dict[int, int] = {}
            for _ in procs:
                sent.update(out.get(timeout=args.duration + 120))
            for p in procs:
                p.join()

        rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(windows, windows[1:], strict=False)]
        steady = rates[1:-2] or rates
        with psycopg.connect(libpq) as c:
            rows = {
                r[0]: r[1:]
                for r in c.execute(
                    "SELECT job_id, count(*), count(DISTINCT (name, step)), max(step) FROM metrics GROUP BY job_id"
                )
            }
            rollup = dict(c.execute("SELECT job_id, sum(n) FROM metric_rollups GROUP BY job_id").fetchall())
            size = sum(
                c.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0]  # type: ignore[index]
                for t in ("metrics", "metric_rollups")
            )
        expected = {j: n * args.series for j, n in sent.items()}
        stored = sum(r[0] for r in rows.values())
        lost = sum(max(0, expected[j] - rows.get(j, (0, 0, 0))[1]) for j in expected)
        duplicated = sum(r[0] - r[1] for r in rows.values())
        extra = sum(max(0, rows[j][1] - expected.get(j, 0)) for j in rows)
        bad_rollups = sum(1 for j in rows if rollup.get(j) != rows[j][0])

        print(
            f"\nsent {sum(expected.values()):,} points, stored {stored:,}: lost {lost}, duplicated {duplicated}, "
            f"unexpected {extra}; rollup counts disagree for {bad_rollups} jobs"
        )
        print(
            f"stored points/s: mean of steady 5 s windows {statistics.mean(steady):,.0f}, slowest {min(steady):,.0f}"
            f" (offered {rate:,.0f})"
        )
        print(f"database: {size / 2**20:,.1f} MiB for {stored:,} points = {size / max(1, stored):.1f} bytes/point")
        print("reads during ingestion:")
        for label, ms in lat.items():
            print(
                f"  {label:<46} n={len(ms):5d}  p50 {statistics.median(ms):7.2f}  p95 {percentile(ms, 95):7.2f}  "
                f"p99 {percentile(ms, 99):7.2f} ms"
            )


if __name__ == "__main__":
    main()
