"""Fault injection: N faults of each kind against real `icd worker` processes on Redis and PostgreSQL.

Kinds: kill -9 of a whole worker (parent and Celery child), kill -9 of the Celery child only (its
`icd worker` restarts it), SIGTERM of a worker (warm stop: checkpoint and re-queue), a broker restart
(a private redis-server on a free port, killed and started again), and kill -9 inside a checkpoint
write (workers started with the test hook that pauses between the write and the rename).

Each injection submits one tiny CPU training job to a pair of idle workers, injects the fault into
the worker running it once it passed a random step, and follows the job to its end. Per kind it
prints: runs, jobs lost (did not succeed), run twice (two attempts overlapping in time, or more
attempts than faults + 1), stuck (not finished within --job-timeout), metric steps duplicated or
missing (the loss series against 1..iterations), and the time from the fault to the job running
again (a new attempt making progress; for the broker, progress after the restart) as p50/max.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fault_injection.py -n 20 --out benchmarks/results/fault_injection

The API runs in-process with its reaper; the lease timeout and heartbeat are flags (short by default,
so a lost worker is noticed within seconds; production defaults are 30 s and 10 s).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from service.fault_harness import (  # noqa: E402
    HOST,
    PrivateRedis,
    Stack,
    pg_database,
    tiny_train_spec,
    wait_for,
)

KINDS = ("kill9_worker", "kill9_celery_child", "sigterm_worker", "broker_restart", "kill9_mid_checkpoint")
TERMINAL = ("succeeded", "failed", "canceled")


def _ts(value: str | None) -> float | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() if value else None


def _overlapping(attempts: list[dict[str, Any]]) -> bool:
    """Two attempts that ran at the same time (a double run)."""
    spans = sorted((_ts(a["started_at"]) or 0.0, _ts(a["finished_at"]) or float("inf")) for a in attempts)
    return _spans_overlap(spans)


def _spans_overlap(spans: list[tuple[float, float]]) -> bool:
    spans = sorted(spans)
    return any(nxt[0] < cur[1] - 1e-3 for cur, nxt in zip(spans, spans[1:]))


_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [A-Z]+/[^\]]*\] (.*)$")


def log_spans(logs: list[str], job_id: int, killed_at: float) -> dict[tuple[str, int], tuple[float, float]]:
    """{(worker log, attempt): (start, end)} of one job, read from the workers' own logs (what each
    process did, not what the database recorded). An attempt with a start line and no end line was
    killed: it ends at `killed_at` (the fault's wall-clock time)."""
    starts: dict[tuple[str, int], float] = {}
    ends: dict[tuple[str, int], float] = {}
    start_re = re.compile(rf"^job {job_id} \(\w+\) attempt (\d+) ")
    end_re = re.compile(rf"^job {job_id} attempt (\d+) ended on ")
    for i, text in enumerate(logs):
        for line in text.splitlines():
            m = _LOG_LINE.match(line)
            if not m:
                continue
            ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if sm := start_re.match(m.group(2)):
                starts[(str(i), int(sm.group(1)))] = ts
            elif em := end_re.match(m.group(2)):
                ends.setdefault((str(i), int(em.group(1))), ts)  # the first: when it stopped touching the job
    return {key: (t0, ends.get(key, killed_at if killed_at >= t0 else float("inf"))) for key, t0 in starts.items()}


class Bench:
    def __init__(self, st: Stack, redis: PrivateRedis, args: argparse.Namespace) -> None:
        self.st, self.redis, self.args = st, redis, args
        self.rng = random.Random(args.seed)
        # A slow post-training phase: every export child waits this long (a large model's exports).
        self.env = {"ICD_TEST_EXPORT_DELAY_S": str(args.export_delay_s)} if args.export_delay_s else {}

    def start_pairs(self) -> None:
        """Two idle workers on queue `cpu` for most kinds, and two with the checkpoint-write hook on queue
        `any` for the mid-checkpoint kind (its jobs say device: auto), so the kinds can interleave."""
        for n in ("plain_a", "plain_b"):
            self.st.start_worker(n, queues="cpu", **self.env)
        for n in ("hook_a", "hook_b"):
            self.st.start_worker(n, queues="any", ICD_TEST_PAUSE_BEFORE_RENAME_S="3", **self.env)
        self.st.wait_workers_alive("plain_a", "plain_b", "hook_a", "hook_b", timeout=240)

    @staticmethod
    def pair(kind: str) -> tuple[str, str]:
        return ("hook_a", "hook_b") if kind == "kill9_mid_checkpoint" else ("plain_a", "plain_b")

    def inject_once(self, kind: str, names: tuple[str, str], i: int) -> dict[str, Any]:
        """One job, one fault of `kind` into the worker running it, followed to the job's end."""
        st, a = self.st, self.args
        device = "auto" if kind == "kill9_mid_checkpoint" else "cpu"
        # Exports on: the post-training phase (export child, latency timing) is part of what is faulted.
        deploy = {"exported_latency": True, "latency_repeats": 3, "latency_warmup": 1, "prediction_images": 2}
        spec = tiny_train_spec(
            f"{kind}-{i}", iterations=a.iterations, checkpoint_every=a.checkpoint_every, device=device, deploy=deploy
        )
        job_id = st.submit(spec)
        before = self._fault_point(kind, job_id)
        victim = before["worker"].split("@")[0]
        t_fault, fault_wall = time.monotonic(), time.time()
        self._inject(kind, victim)
        try:
            back_s = wait_for(
                lambda: self._moved(kind, job_id, before) and time.monotonic() - t_fault,
                a.job_timeout,
                "running again",
                interval=0.1,
            )
        except AssertionError:
            back_s = None
        self._repair(kind, victim)
        try:
            job = wait_for(lambda: (j := st.job(job_id))["status"] in TERMINAL and j, a.job_timeout, "the end")
            stuck = False
        except AssertionError:
            job, stuck = st.job(job_id), True
        steps = st.loss_steps(job_id)
        st.wait_workers_alive(*names, timeout=180)  # both idle again before the next injection
        spans = log_spans([st.log(n) for n in sorted(st.workers)], job_id, fault_wall)
        return {
            "kind": kind,
            "job": job_id,
            "status": job["status"],
            "attempts": job["attempt"],
            "step_at_fault": before["progress_step"],
            "victim": victim,
            "stuck": stuck,
            "lost": job["status"] != "succeeded",
            "run_twice": _overlapping(job["attempts"]) or job["attempt"] > before["attempt"] + 1,
            "log_attempts": len(spans),
            "run_twice_in_logs": _spans_overlap(list(spans.values())),
            "duplicated": len(steps) - len(set(steps)),
            "missing": len(set(range(1, a.iterations + 1)) - set(steps)),
            "back_s": back_s,
            "error": job.get("error"),
        }

    def _fault_point(self, kind: str, job_id: int) -> dict[str, Any]:
        """Wait until the job is where the fault goes: past a random step, or paused inside a checkpoint
        write that follows a complete checkpoint."""
        st, a = self.st, self.args
        if kind != "kill9_mid_checkpoint":
            return st.wait_step(
                job_id, self.rng.randint(a.checkpoint_every + 1, a.iterations // 2), timeout=a.job_timeout
            )
        folder = st.tmp / "home" / "artifacts" / "jobs" / str(job_id) / "checkpoints"
        wait_for(
            lambda: (
                st.job(job_id)["status"] == "running"
                and list(folder.glob("step_*.pt"))
                and list(folder.glob("*.paused"))
            ),
            a.job_timeout,
            "a checkpoint write after the first",
        )
        return st.job(job_id)

    def _inject(self, kind: str, victim: str) -> None:
        st = self.st
        if kind in ("kill9_worker", "kill9_mid_checkpoint"):
            st.kill_worker(victim)
        elif kind == "kill9_celery_child":
            os.kill(st.celery_child(victim), signal.SIGKILL)  # `icd worker` restarts it under the same name
        elif kind == "sigterm_worker":
            st.workers[victim].send_signal(signal.SIGTERM)  # `icd worker`: warm stop of its Celery child
        elif kind == "broker_restart":
            self.redis.stop()
            time.sleep(self.args.broker_down_s)
            self.redis.start()

    def _moved(self, kind: str, job_id: int, before: dict[str, Any]) -> bool:
        """Running again: a new attempt making progress (for the broker: progress after the restart)."""
        j = self.st.job(job_id)
        if j["status"] == "succeeded":
            return True
        if kind == "broker_restart":
            return j["progress_step"] > before["progress_step"]
        resumed = j["attempts"][-1].get("resumed_from_step") or 0
        return j["status"] == "running" and j["attempt"] > before["attempt"] and j["progress_step"] > resumed

    def _repair(self, kind: str, victim: str) -> None:
        """Start again what the fault stopped (the job itself goes on on the other worker meanwhile)."""
        if kind not in ("kill9_worker", "kill9_mid_checkpoint", "sigterm_worker"):
            return
        if kind == "sigterm_worker":
            try:
                self.st.workers[victim].wait(60)
            except Exception:
                self.st.kill_worker(victim)
        if kind == "kill9_mid_checkpoint":
            self.st.start_worker(victim, queues="any", ICD_TEST_PAUSE_BEFORE_RENAME_S="3", **self.env)
        else:
            self.st.start_worker(victim, queues="cpu", **self.env)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for kind in KINDS:
        rs = [r for r in runs if r["kind"] == kind and "harness_error" not in r]
        if not rs:
            continue
        backs = [r["back_s"] for r in rs if r["back_s"] is not None]
        rows.append(
            {
                "kind": kind,
                "runs": len(rs),
                "lost": sum(r["lost"] for r in rs),
                "run_twice": sum(r["run_twice"] for r in rs),
                "run_twice_in_logs": sum(r.get("run_twice_in_logs", False) for r in rs),
                "stuck": sum(r["stuck"] for r in rs),
                "steps_duplicated": sum(r["duplicated"] for r in rs),
                "steps_missing": sum(r["missing"] for r in rs),
                "back_p50_s": round(statistics.median(backs), 1) if backs else None,
                "back_max_s": round(max(backs), 1) if backs else None,
                "never_back": len(rs) - len(backs),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| fault | runs | jobs lost | run twice (database / worker logs) | stuck | steps duplicated | steps missing "
        "| fault → running again p50 / max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        back = f"{r['back_p50_s']} s / {r['back_max_s']} s" if r["back_p50_s"] is not None else "never"
        if r["never_back"]:
            back += f" ({r['never_back']} never)"
        lines.append(
            f"| {r['kind']} | {r['runs']} | {r['lost']} | {r['run_twice']} / {r['run_twice_in_logs']} | {r['stuck']} | "
            f"{r['steps_duplicated']} | {r['steps_missing']} | {back} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--injections", type=int, default=5, help="faults of each kind")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--lease-s", type=float, default=5.0)
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    p.add_argument("--reaper-s", type=float, default=0.5)
    p.add_argument("--broker-down-s", type=float, default=2.0)
    p.add_argument("--job-timeout", type=float, default=180.0)
    p.add_argument(
        "--export-delay-s",
        type=float,
        default=0.0,
        help="make every job's post-training phase this much slower (its export child waits): longer than "
        "the lease, it shows whether that phase keeps its lease",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop-after-min",
        type=float,
        default=None,
        help="start no new round of injections after this many minutes (the kinds interleave, so "
        "every kind has had the same number of rounds)",
    )
    p.add_argument("--out", type=Path, default=None, help="folder for runs.jsonl, summary.json and table.md")
    args = p.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(KINDS)
    if unknown:
        p.error(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="icd-faults-") as tmp, pg_database() as db_url:
        redis = PrivateRedis(Path(tmp) / "redis")
        redis.start()
        st = Stack(
            Path(tmp), db_url, redis.url, lease_s=args.lease_s, heartbeat_s=args.heartbeat_s, reaper_s=args.reaper_s
        )
        try:
            st.start_api()
            bench = Bench(st, redis, args)
            bench.start_pairs()
            for i in range(args.injections):
                if args.stop_after_min and time.monotonic() - started > 60 * args.stop_after_min:
                    print(f"stopping after {i} rounds: --stop-after-min {args.stop_after_min} reached", flush=True)
                    break
                for kind in kinds:  # interleaved: round i injects one fault of each kind
                    try:
                        run = bench.inject_once(kind, bench.pair(kind), i)
                    except AssertionError as exc:  # the harness could not inject: recorded, not counted
                        run = {"kind": kind, "harness_error": str(exc)}
                        st.wait_workers_alive(*bench.pair(kind), timeout=240)
                    runs.append(run)
                    print(json.dumps(run), flush=True)
                    if args.out:
                        with open(args.out / "runs.jsonl", "a") as f:
                            f.write(json.dumps(run) + "\n")
        finally:
            st.close()
            redis.stop()
    rows = summarize(runs)
    text = table(rows)
    rounds = min((r["runs"] for r in rows), default=0)
    header = (
        f"{rounds} injections per kind (asked {args.injections}), {args.iterations}-step jobs (checkpoint every "
        f"{args.checkpoint_every}), lease {args.lease_s} s, heartbeat {args.heartbeat_s} s, reaper every "
        f"{args.reaper_s} s, post-training phase slowed by {args.export_delay_s} s, host {HOST}, "
        f"{time.monotonic() - started:.0f} s in all"
    )
    print(header)
    print(text)
    if args.out:
        (args.out / "summary.json").write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
        )
        (args.out / "table.md").write_text(header + "\n\n" + text + "\n")


if __name__ == "__main__":
    main()
