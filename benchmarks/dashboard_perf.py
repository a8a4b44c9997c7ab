"""Dashboard job page with a 100k-point series: time to first chart in headless Chromium, and bytes per live
update (issue 11, performance).

Seeds a fresh database (SQLite in a temporary folder, or PostgreSQL with --postgres) with one running train job whose
series `loss`, `classification` and `lr` hold --points steps each, starts `icd serve --no-worker` on a free
loopback port, and opens the job page in headless Chromium (/usr/bin/chromium) --runs times:
- time to first chart: navigation start → the first uPlot chart drawn with its data (window.icd.firstChartMs);
- bytes per live update: while a writer thread adds one step per second to every series (as a worker's
  reporter does), the Resource Timing entries of the page's polls (job, metrics since_step, evaluations
  since_step, log offset, and checkpoints every fifth poll) are summed per poll (transferSize: headers + body).
For scale it prints the size of the whole series (what refetching it every poll would cost) and of the
page's first, downsampled metrics response.

    .venv/bin/python benchmarks/dashboard_perf.py [--points 100000] [--runs 5] [--polls 10] [--postgres]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api.docs import TRAIN_EXAMPLE  # noqa: E402
from store.db import make_engine, session_factory, upgrade_database  # noqa: E402
from store.jobs import claim_job, create_job, update_progress  # noqa: E402
from store.results import add_metrics  # noqa: E402

SERIES = ("loss", "classification", "lr")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed(url: str, points: int) -> int:
    """One running job with `points` steps of each series; returns its id."""
    engine = make_engine(url)
    with session_factory(engine)() as s:
        job = create_job(s, {**TRAIN_EXAMPLE, "name": "perf-100k"}, kind="train", name="perf-100k", queue="cpu")
        claim_job(s, job.id, "bench@localhost")
        batch: list[tuple[str, int, float]] = []
        for step in range(1, points + 1):
            batch += [
                ("loss", step, 2.0 / (1 + step / 5000) + (step % 97) / 500),
                ("classification", step, 1.0 / step),
                ("lr", step, 0.01 * (1 - step / (points + 10))),
            ]
            if len(batch) >= 30_000:
                add_metrics(s, job.id, 1, batch)
                batch = []
        add_metrics(s, job.id, 1, batch)
        update_progress(s, job.id, points, points * 2, 0.1)
        job_id = job.id
    engine.dispose()
    return job_id


def writer(url: str, job_id: int, start: int, stop: threading.Event) -> None:
    """Add one step per series each second, like a worker's reporter, while the page polls."""
    engine = make_engine(url)
    step = start
    with session_factory(engine)() as s:
        while not stop.wait(1.0):
            step += 1
            add_metrics(s, job_id, 1, [(n, step, 1.0) for n in SERIES])
            update_progress(s, job_id, step, start * 2, 0.1)
    engine.dispose()


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1600",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)


def wait_js(driver: Any, script: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out: {script}")


FIRST_METRICS_MS = """
const e = performance.getEntriesByType("resource").find(e => e.name.includes("max_points="));
return e ? e.responseEnd - e.startTime : null;
"""

POLL_BYTES = """
const entries = performance.getEntriesByType("resource").filter(e => e.name.includes("/jobs/" + arguments[0]));
const ticks = entries.filter(e => new URL(e.name).pathname === "/jobs/" + arguments[0]);
const after = ticks.length > 1 ? ticks[1].startTime : Infinity;  // skip the first load
const polls = entries.filter(e => e.startTime >= after);
return {polls: ticks.length - 1, bytes: polls.reduce((n, e) => n + e.transferSize, 0),
        body: polls.reduce((n, e) => n + e.encodedBodySize, 0), requests: polls.length};
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=100_000, help="steps per series (3 series)")
    ap.add_argument("--runs", type=int, default=5, help="page loads for time to first chart")
    ap.add_argument("--polls", type=int, default=10, help="live updates to measure")
    ap.add_argument(
        "--postgres",
        action="store_true",
        help="a fresh PostgreSQL database at 127.0.0.1:5432 (created, then dropped) instead of SQLite",
    )
    args = ap.parse_args()
    if not args.postgres:
        run(args, None)
        return
    import psycopg

    name = f"icd_dashperf_{uuid.uuid4().hex[:8]}"
    for user in ("postgres", "root"):
        try:
            admin = psycopg.connect(f"postgresql://{user}@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=3)
            break
        except psycopg.OperationalError:
            continue
    else:
        raise SystemExit("PostgreSQL unreachable at 127.0.0.1:5432")
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        run(args, f"postgresql+psycopg://{user}@127.0.0.1:5432/{name}")
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def run(args: argparse.Namespace, database_url: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="icd-dashperf-"))
    url = database_url or f"sqlite:///{tmp / 'icd.db'}"
    upgrade_database(url)
    t0 = time.perf_counter()
    job_id = seed(url, args.points)
    print(
        f"seeded job {job_id}: {len(SERIES)} series x {args.points:,} steps in {time.perf_counter() - t0:.1f} s "
        f"({url.split(':')[0]})"
    )

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICD_")}
    env.update(
        ICD_HOME=str(tmp / "home"),
        ICD_DATABASE_URL=url,
        ICD_BROKER_URL=f"sqla+sqlite:///{tmp / 'b.db'}",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp / "api.log", "wb")  # noqa: SIM115 - closed at the end
    api = subprocess.Popen(
        [sys.executable, "-m", "icd_cli", "serve", "--no-worker", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    driver = None
    stop = threading.Event()
    try:
        with httpx.Client(base_url=base, timeout=60) as http:
            for _ in range(200):
                try:
                    http.get("/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            full = len(http.get(f"/jobs/{job_id}/metrics").content)
            first = len(http.get(f"/jobs/{job_id}/metrics", params={"max_points": 1000}).content)
        driver = browser()
        driver.get(f"{base}/")  # warm the browser cache of the vendored assets, as a returning user has it
        wait_js(driver, "return document.querySelector('tr[data-job]')")
        times: list[float] = []
        fetches: list[float] = []
        for _ in range(args.runs):
            driver.get("about:blank")
            driver.get(f"{base}/#/jobs/{job_id}")
            times.append(wait_js(driver, "return window.icd && window.icd.firstChartMs"))
            fetches.append(driver.execute_script(FIRST_METRICS_MS))
            counts = driver.execute_script("return window.icd.charts.losses.pointCount()")
        print(
            f"time to first chart: median {statistics.median(times):.0f} ms, max {max(times):.0f} ms "
            f"over {args.runs} loads, of which the downsampled metrics request {statistics.median(fetches):.0f} ms "
            f"(points drawn per series: {counts})"
        )

        thread = threading.Thread(target=writer, args=(url, job_id, args.points, stop), daemon=True)
        thread.start()
        driver.execute_script("performance.setResourceTimingBufferSize(10000)")
        wait_js(
            driver, f"return window.icd.jobPage && window.icd.jobPage.polls > {args.polls}", timeout=args.polls * 4 + 30
        )
        res = driver.execute_script(POLL_BYTES, job_id)
        after = driver.execute_script("return window.icd.charts.losses.pointCount()")
        per = res["bytes"] / max(1, res["polls"])
        print(
            f"live updates: {res['polls']} polls, {res['requests']} requests, {per:,.0f} bytes per poll "
            f"(bodies {res['body'] / max(1, res['polls']):,.0f} B); chart now holds {after}"
        )
        print(
            f"for scale: the whole series is {full:,} bytes (refetching it each poll); "
            f"the first, downsampled load is {first:,} bytes"
        )
    finally:
        stop.set()
        if driver is not None:
            driver.quit()
        api.terminate()
        api.wait(30)
        log.close()


if __name__ == "__main__":
    main()
