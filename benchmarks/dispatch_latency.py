"""Dispatch latency: from a POST /jobs response to the job being 'running' on an idle worker.

Starts a real `celery -A worker.app worker` on the Redis broker (database 8, flushed) and the API
on a temporary SQLite database (or --database-url), then submits --jobs tiny 1-iteration train jobs
one at a time, each after the previous one finished (so the worker is idle), and takes the time
from sending the POST to the job's started_at (set by claim_job when the worker picks it up).
Prints p50/p95 and the ratio to the 0.5 s target.

    .venv/bin/python benchmarks/dispatch_latency.py --jobs 50
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.harness import percentile  # noqa: E402
from worker.supervisor import WorkerSpec  # noqa: E402

TARGET_S = 0.5
SPEC = {
    "kind": "train",
    "name": "dispatch-probe",
    "device": "cpu",
    "data": {
        "train": {"format": "shapes", "num_images": 4, "image_size": 64, "max_object": 32},
        "val": {"format": "shapes", "num_images": 2, "image_size": 64, "max_object": 32, "seed": 1},
        "min_size": 64,
        "max_size": 64,
        "workers": 0,
    },
    "model": {
        "detector": "retinanet",
        "backbone": "resnet18",
        "fpn_channels": 16,
        "levels": ["p3", "p4", "p5"],
        "head_convs": 1,
    },
    "schedule": {"iterations": 1, "batch_size": 1, "warmup_iters": 0, "eval_every": 0, "checkpoint_every": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--broker-url", default="redis://127.0.0.1:6379/8")
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    args = parser.parse_args()

    import redis
    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from api.main import create_app
    from store.db import make_engine, session_factory
    from store.models import Job
    from store.settings import Settings

    tmp = Path(tempfile.mkdtemp(prefix="icd-dispatch-"))
    db_url = args.database_url or f"sqlite:///{tmp / 'icd.db'}"
    if args.broker_url.startswith("redis"):
        redis.Redis.from_url(args.broker_url).flushdb()
    settings = Settings(
        home=tmp / "home", database_url=db_url, broker_url=args.broker_url, auto_migrate=True, worker_heartbeat_s=1.0
    )
    app = create_app(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICD_")}
    env.update(
        ICD_HOME=str(tmp / "home"),
        ICD_DATABASE_URL=db_url,
        ICD_BROKER_URL=args.broker_url,
        ICD_WORKER_HEARTBEAT_S="1",
        PYTHONPATH=str(REPO),
    )
    log = open(tmp / "worker.log", "wb")  # noqa: SIM115 - closed in finally
    worker = subprocess.Popen(
        WorkerSpec(name="bench@localhost", queues="cpu,any", loglevel="WARNING").command(),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    latencies: list[float] = []  # POST sent -> started_at (the worker's claim)
    post_times: list[float] = []  # POST sent -> 201 received
    try:
        with TestClient(app) as client:
            deadline = time.monotonic() + 120
            while not client.get("/workers").json():
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit(f"no worker came up; see {tmp / 'worker.log'}")
                time.sleep(0.2)
            for i in range(args.jobs + 1):  # the first job warms up the worker (first dataset build)
                sent = time.time()
                r = client.post("/jobs", json=SPEC)
                answered = time.time()
                assert r.status_code == 201, r.text
                job_id = r.json()["id"]
                started: datetime | None = None
                while True:
                    with sessions() as s:
                        status, started_at = s.execute(select(Job.status, Job.started_at).where(Job.id == job_id)).one()
                    if started is None and started_at is not None:
                        started = started_at
                    if status in ("succeeded", "failed", "canceled"):
                        break
                    time.sleep(0.01)
                if status != "succeeded":
                    raise SystemExit(f"job {job_id} {status}: {client.get(f'/jobs/{job_id}').json()['error']}")
                assert started is not None
                if i > 0:
                    latencies.append(started.timestamp() - sent)
                    post_times.append(answered - sent)
    finally:
        worker.terminate()
        worker.wait(60)
        log.close()
        engine.dispose()
        app.state.engine.dispose()

    p50, p95 = statistics.median(latencies), percentile(latencies, 95)
    print(f"broker {args.broker_url.split('://')[0]}, database {db_url.split(':')[0]}, {len(latencies)} jobs")
    print(
        f"POST round trip: p50 {statistics.median(post_times) * 1000:.0f} ms (the worker often claims the job "
        "before the 201 arrives, so latency is measured from sending the POST)"
    )
    print(f"POST -> running: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    print(f"p50 / target ({TARGET_S} s) = {p50 / TARGET_S:.3f}  ({'OK' if p50 <= TARGET_S else 'OVER'})")


if __name__ == "__main__":
    main()
