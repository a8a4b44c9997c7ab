"""Scheduler order, preemption and quotas with 2 real CPU workers (docs/scheduling.md).

Two `icd worker --cpu` processes (the supervisor users start) on PostgreSQL and a private redis-server,
the API in-process with its reaper, tiny CPU training jobs (tests/helpers.py's model and data).

1. `urgent` (with preemption, then without): owner A submits 10 low-priority jobs; once both workers run
   one of them, owner B submits 1 high-priority job. Reported: B's submit → B running (from the
   database: B's created_at → its first attempt's started_at), A's lost and repeated steps (each A job's
   loss series against 1..N; must be 0), the preemptions, and the order in which the jobs (re)started.
2. `quota`: A has max_running 1; A submits 20 jobs, then B 20. Reported: the order the 40 jobs started
   (A/B letters), the most A jobs ever running at once, and when each owner's last job started.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scheduler_order.py --out benchmarks/results/scheduler-2026-12-07

No figure here is asserted by a test; the tests (tests/service/test_scheduling*.py) assert the order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from service.fault_harness import PrivateRedis, Stack, pg_database, tiny_train_spec, wait_for  # noqa: E402

TERMINAL = ("succeeded", "failed", "canceled")


def _ts(value: str | None) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else float("nan")


def _spec(name: str, iterations: int, priority: int) -> dict[str, Any]:
    return {**tiny_train_spec(name, iterations, checkpoint_every=iterations), "priority": priority}


class Bench:
    """One stack (API + 2 workers) per scenario, so each starts from an empty queue."""

    def __init__(self, tmp: Path, db_url: str, redis: PrivateRedis, env: dict[str, str]) -> None:
        self.st = Stack(tmp, db_url, redis.url, lease_s=5.0, heartbeat_s=0.5, reaper_s=0.5, extra_env=env)
        self.secrets: dict[str, str] = {}

    def __enter__(self) -> Bench:
        self.st.start_api()
        for name in ("w1", "w2"):
            self.st.start_worker(name)
        self.st.wait_workers_alive("w1", "w2")
        return self

    def __exit__(self, *_: Any) -> None:
        self.st.close()

    def tokens(self, quotas: dict[str, dict[str, int | None]]) -> None:
        from store.db import make_engine, session_factory
        from store.tokens import Quota, create_token

        engine = make_engine(self.st.database_url)
        with session_factory(engine)() as s:
            for name, quota in quotas.items():
                self.secrets[name] = create_token(s, name, quota=Quota(**quota))[1]  # type: ignore[arg-type]
        engine.dispose()

    def submit(self, owner: str, spec: dict[str, Any]) -> int:
        r = self.st.client.post("/jobs", json=spec, headers={"Authorization": f"Bearer {self.secrets[owner]}"})
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    def wait_all(self, ids: list[int], timeout: float) -> dict[int, dict[str, Any]]:
        wait_for(lambda: all(self.st.job(i)["status"] in TERMINAL for i in ids), timeout, "every job to end", 1.0)
        return {i: self.st.job(i) for i in ids}


def urgent(tmp: Path, db_url: str, redis: PrivateRedis, args: argparse.Namespace, preemption: bool) -> dict[str, Any]:
    env = {"ICD_PREEMPTION": "1" if preemption else "0", "ICD_PREEMPT_MIN_RUN_S": str(args.min_run_s)}
    os.environ.update(env)  # the in-process API reads its settings from the environment too
    with Bench(tmp, db_url, redis, env) as b:
        b.tokens({"A": {}, "B": {"max_priority": 10}})
        a_ids = [b.submit("A", _spec(f"A{i}", args.a_steps, 0)) for i in range(10)]
        wait_for(
            lambda: sum(b.st.job(i)["status"] == "running" and b.st.job(i)["progress_step"] >= 2 for i in a_ids) == 2,
            300,
            "two A jobs training",
        )
        time.sleep(args.min_run_s)  # past the minimum run time of both running A jobs
        b_id = b.submit("B", _spec("B-urgent", args.b_steps, 10))
        jobs = b.wait_all([*a_ids, b_id], args.timeout)
        lost = repeated = 0
        for i in a_ids:
            steps = b.st.loss_steps(i)
            lost += len(set(range(1, args.a_steps + 1)) - set(steps))
            repeated += len(steps) - len(set(steps))
        starts = sorted(
            (_ts(a["started_at"]), jobs[i]["name"] + ("" if a["number"] == 1 else f"(resume {a['number']})"))
            for i in jobs
            for a in jobs[i]["attempts"]
        )
        bj = jobs[b_id]
        preempted = [
            {"job": jobs[i]["name"], "detail": a["error"]}
            for i in a_ids
            for a in jobs[i]["attempts"]
            if a["status"] == "preempted"
        ]
    return {
        "scenario": f"urgent, preemption {'on' if preemption else 'off'}",
        "b_submit_to_running_s": round(_ts(bj["attempts"][0]["started_at"]) - _ts(bj["created_at"]), 2),
        "a_steps_lost": lost,
        "a_steps_repeated": repeated,
        "all_succeeded": all(j["status"] == "succeeded" for j in jobs.values()),
        "preemptions": preempted,
        "start_order": [name for _, name in starts],
    }


def quota(tmp: Path, db_url: str, redis: PrivateRedis, args: argparse.Namespace) -> dict[str, Any]:
    os.environ["ICD_PREEMPTION"] = "0"  # equal priorities: nothing to preempt; said for clarity
    with Bench(tmp, db_url, redis, {"ICD_PREEMPTION": "0"}) as b:
        b.tokens({"A": {"max_running": 1}, "B": {}})
        a_ids = [b.submit("A", _spec(f"A{i}", args.q_steps, 0)) for i in range(20)]
        b_ids = [b.submit("B", _spec(f"B{i}", args.q_steps, 0)) for i in range(20)]
        held = b.st.job(a_ids[-1])["status_detail"]
        jobs = b.wait_all([*a_ids, *b_ids], args.timeout * 2)
    spans = {i: (_ts(j["attempts"][0]["started_at"]), _ts(j["attempts"][-1]["finished_at"])) for i, j in jobs.items()}
    order = sorted(jobs, key=lambda i: spans[i][0])
    a_set = set(a_ids)
    edges = sorted([(spans[i][0], 1) for i in a_ids] + [(spans[i][1], -1) for i in a_ids])
    running = peak = 0
    for _, d in edges:
        running += d
        peak = max(peak, running)
    t0 = min(_ts(j["created_at"]) for j in jobs.values())
    return {
        "scenario": "quota: A max_running 1, A 20 jobs then B 20, 2 workers",
        "start_order": "".join("A" if i in a_set else "B" for i in order),
        "max_a_running_at_once": peak,
        "all_succeeded": all(j["status"] == "succeeded" for j in jobs.values()),
        "last_a_start_s": round(max(spans[i][0] for i in a_ids) - t0, 1),
        "last_b_start_s": round(max(spans[i][0] for i in b_ids) - t0, 1),
        "held_detail_example": held,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a-steps", type=int, default=30, help="steps of each of A's 10 jobs")
    p.add_argument("--b-steps", type=int, default=10, help="steps of B's urgent job")
    p.add_argument("--q-steps", type=int, default=2, help="steps of each job of the quota scenario")
    p.add_argument("--min-run-s", type=float, default=3.0, help="ICD_PREEMPT_MIN_RUN_S (production default 60)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=None, help="folder for results.json and run.txt")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="icd-sched-") as tmp:
        redis = PrivateRedis(Path(tmp) / "redis")
        redis.start()
        try:
            for n, run in enumerate(
                (
                    lambda t, d: urgent(t, d, redis, args, preemption=True),
                    lambda t, d: urgent(t, d, redis, args, preemption=False),
                    lambda t, d: quota(t, d, redis, args),
                )
            ):
                folder = Path(tmp) / f"s{n}"
                folder.mkdir()
                import redis as redis_client

                redis_client.Redis.from_url(redis.url).flushdb()  # no wake-up of the previous scenario's jobs
                with pg_database() as db_url:
                    started = time.monotonic()
                    result = run(folder, db_url)
                    result["wall_s"] = round(time.monotonic() - started, 1)
                print(json.dumps(result, indent=2), flush=True)
                results.append(result)
        finally:
            redis.stop()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {"args": vars(args) | {"out": str(args.out)}, "results": results}
        (args.out / "results.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
