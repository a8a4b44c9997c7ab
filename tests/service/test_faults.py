"""Faults against real processes: `icd worker` processes on Redis (database ICD_TEST_REDIS_DB, or a
private redis-server for the broker restart) and PostgreSQL, the API with its reaper in-process.

Leases last 3 s and heartbeats come every 0.5 s here, so each test takes seconds, not minutes. Each
asserts what a user sees: the job succeeds (or fails with the reason), on which attempt and worker,
from which checkpoint it resumed, and that its loss series has every step exactly once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import IN_CI, flushed_redis_url

from .fault_harness import (
    HOST,
    PrivateRedis,
    Stack,
    alive,
    descendants,
    free_port,
    icd_command,
    pg_database,
    stack,
    tiny_train_spec,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(300)]


@pytest.fixture
def database() -> Iterator[str]:
    try:
        with pg_database() as url:
            yield url
    except ConnectionError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def stk(tmp_path: Path, database: str) -> Iterator[Stack]:
    with stack(tmp_path, database, flushed_redis_url()) as st:
        yield st


def _dump(st: Stack, job_id: int) -> str:
    logs = "\n".join(f"--- {n}\n{st.log(n)[-2500:]}" for n in st.workers)
    return f"{st.job(job_id)}\n{logs}"


def assert_resumed(st: Stack, job_id: int, iterations: int, on: str, attempt: int = 2) -> dict[str, Any]:
    """Succeeded on `on` as attempt `attempt`, resumed from a checkpoint, every step exactly once."""
    job = st.wait_end(job_id)
    assert job["status"] == "succeeded", _dump(st, job_id)
    assert job["attempt"] == attempt and job["worker"] == f"{on}@{HOST}", _dump(st, job_id)
    first, last = job["attempts"][0], job["attempts"][-1]
    assert first["status"] == "lost" and "lost at step" in first["error"]
    assert last["status"] == "succeeded" and last["resumed_from_step"] and last["resumed_from_step"] > 0
    assert st.loss_steps(job_id) == list(range(1, iterations + 1))
    assert "resumed from" in st.client.get(f"/jobs/{job_id}/logs").text
    return job


def test_kill9_whole_worker_resumes_on_the_idle_one(stk: Stack) -> None:
    stk.start_worker("a")
    stk.start_worker("b")
    stk.wait_workers_alive("a", "b")
    job_id = stk.submit(tiny_train_spec("kill9", iterations=40, checkpoint_every=5))
    running = stk.wait_step(job_id, 12)
    victim = running["worker"].split("@")[0]
    stk.kill_worker(victim)
    other = "b" if victim == "a" else "a"
    assert_resumed(stk, job_id, 40, on=other)


def test_kill9_then_a_worker_under_another_name(stk: Stack) -> None:
    stk.start_worker("c")
    stk.wait_workers_alive("c")
    job_id = stk.submit(tiny_train_spec("rename", iterations=40, checkpoint_every=5))
    stk.wait_step(job_id, 12)
    stk.kill_worker("c")
    stk.start_worker("d")
    assert_resumed(stk, job_id, 40, on="d")


def test_kill9_of_the_celery_child_only_resumes_automatically(stk: Stack) -> None:
    stk.start_worker("e")
    stk.wait_workers_alive("e")
    job_id = stk.submit(tiny_train_spec("child", iterations=40, checkpoint_every=5))
    stk.wait_step(job_id, 12)
    os.kill(stk.celery_child("e"), signal.SIGKILL)  # `icd worker` restarts it under the same name
    assert_resumed(stk, job_id, 40, on="e")


def test_over_max_attempts_fails_with_the_reason(stk: Stack) -> None:
    stk.start_worker("f")
    stk.wait_workers_alive("f")
    job_id = stk.submit(tiny_train_spec("doomed", iterations=200, checkpoint_every=5, max_attempts=1))
    step = stk.wait_step(job_id, 3)["progress_step"]
    stk.kill_worker("f")
    job = stk.wait_end(job_id, timeout=60)  # the API's reaper, no worker left
    assert job["status"] == "failed"
    assert job["error"].startswith(f"worker f@{HOST} lost at step "), job["error"]
    assert int(job["error"].split("lost at step ")[1].split(";")[0]) >= step
    assert "1 attempt used" in job["error"]


def test_cancel_works_on_a_job_whose_worker_is_dead(stk: Stack) -> None:
    stk.start_worker("g")
    stk.wait_workers_alive("g")
    job_id = stk.submit(tiny_train_spec("orphan", iterations=500, checkpoint_every=50))
    stk.wait_step(job_id, 2)
    stk.kill_worker("g")
    r = stk.client.post(f"/jobs/{job_id}/cancel")
    assert r.status_code == 200
    assert stk.wait_end(job_id, timeout=30)["status"] == "canceled"


def test_a_job_outliving_the_visibility_timeout_runs_once(tmp_path: Path, database: str) -> None:
    with stack(tmp_path, database, flushed_redis_url(), extra_env={"ICD_REDIS_VISIBILITY_TIMEOUT_S": "1"}) as st:
        st.start_worker("h")
        st.start_worker("i")
        st.wait_workers_alive("h", "i")
        job_id = st.submit(tiny_train_spec("long", iterations=150, checkpoint_every=50))
        job = st.wait_end(job_id, timeout=240)
        assert job["status"] == "succeeded", _dump(st, job_id)
        assert job["attempt"] == 1 and len(job["attempts"]) == 1, _dump(st, job_id)
        assert st.loss_steps(job_id) == list(range(1, 151))
        # The broker did redeliver it: each worker received the message (a no-op for the idle one).
        received = [n for n in ("h", "i") if "Task icd.run_job" in st.log(n) and "received" in st.log(n)]
        assert received == ["h", "i"], _dump(st, job_id)


def test_broker_restarted_during_a_job(tmp_path: Path, database: str) -> None:
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    try:
        with stack(tmp_path, database, redis.url) as st:
            st.start_worker("j")
            st.wait_workers_alive("j")
            job_id = st.submit(tiny_train_spec("broker", iterations=60, checkpoint_every=10))
            st.wait_step(job_id, 5)
            redis.stop()
            st.wait_step(job_id, st.job(job_id)["progress_step"] + 3)  # training goes on without the broker
            redis.start()
            job = st.wait_end(job_id)
            assert job["status"] == "succeeded" and job["attempt"] == 1, _dump(st, job_id)
            assert st.loss_steps(job_id) == list(range(1, 61))
            after = st.submit(tiny_train_spec("after", iterations=2, checkpoint_every=0))
            assert st.wait_end(after)["status"] == "succeeded", _dump(st, after)  # the worker reconnected
    finally:
        redis.stop()


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(stk: Stack) -> None:
    stk.start_worker("k", ICD_TEST_PAUSE_BEFORE_RENAME_S="4")
    stk.wait_workers_alive("k")
    job_id = stk.submit(tiny_train_spec("ckpt", iterations=30, checkpoint_every=10))
    stk.wait_step(job_id, 1)
    stk.start_worker("l")  # idle, without the write hook
    stk.wait_workers_alive("l")
    folder = stk.tmp / "home" / "artifacts" / "jobs" / str(job_id) / "checkpoints"
    wait_for(lambda: (folder / "step_0000010.pt").is_file(), 120, "the first checkpoint")
    wait_for(lambda: (folder / "step_0000020.pt.paused").exists(), 120, "the second write to pause before its rename")
    assert (folder / "step_0000020.pt.tmp").is_file()
    stk.kill_worker("k")
    job = assert_resumed(stk, job_id, 30, on="l")
    assert job["attempts"][-1]["resumed_from_step"] == 10
    assert not list(folder.glob("*.tmp"))  # the stale temporary was removed at the attempt's start
    names = [c["name"] for c in stk.client.get(f"/jobs/{job_id}/checkpoints").json()]
    assert all((folder / n).is_file() for n in names)  # pruned ones left the list


def test_kill9_mid_export_leaves_an_export_that_is_retried_and_succeeds(stk: Stack) -> None:
    """An export is a job: the worker running it dies (its export child with it), the reaper re-queues it,
    and another worker runs it again from the start (exports keep no checkpoint)."""
    stk.start_worker("m", ICD_TEST_EXPORT_DELAY_S="600")  # its export child waits: killed mid-export
    stk.wait_workers_alive("m")
    spec = tiny_train_spec("to-export", iterations=2, checkpoint_every=0)
    spec["deploy"] = {**spec["deploy"], "exported_latency": False}  # the run's own exports would wait too
    train = stk.submit(spec)
    assert stk.wait_end(train)["status"] == "succeeded", _dump(stk, train)
    r = stk.client.post(f"/jobs/{train}/exports", json={"format": "torchscript", "verify_images": 1, "eval_images": 2})
    assert r.status_code == 202, r.text
    export = r.json()["job_id"]
    folder = stk.tmp / "home" / "artifacts" / "jobs" / str(export) / "exports"
    wait_for(lambda: (folder / "export.log").is_file(), 120, "the export child to start")
    stk.start_worker("n")
    stk.wait_workers_alive("n")
    assert stk.job(export)["status"] == "running" and stk.job(export)["worker"] == f"m@{HOST}"
    stk.kill_worker("m")

    job = stk.wait_end(export, timeout=240)
    assert job["status"] == "succeeded" and job["kind"] == "export", _dump(stk, export)
    assert job["attempt"] == 2 and job["worker"] == f"n@{HOST}", _dump(stk, export)
    assert [a["status"] for a in job["attempts"]] == ["lost", "succeeded"]
    done = stk.client.get(f"/jobs/{train}/exports/torchscript").json()
    assert done["status"] == "succeeded" and done["job_id"] == export, done
    file = stk.client.get(done["url"])
    assert file.status_code == 200 and hashlib.sha256(file.content).hexdigest() == done["sha256"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGKILL])
def test_serve_stops_its_whole_tree(tmp_path: Path, sig: int) -> None:
    """TERM/HUP/INT: serve stops its worker in order. KILL: no cleanup runs, the worker dies with it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICD_")}
    env.update(ICD_HOME=str(tmp_path / "home"), ICD_WORKER_HEARTBEAT_S="1", OMP_NUM_THREADS="1")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(
            [*icd_command(), "serve", "--port", str(port), "--stop-grace", "20"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree: list[int] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            def healthy() -> bool:
                assert serve.poll() is None, log.read_text()[-3000:]
                try:
                    return bool(client.get("/health").json().get("workers", {}).get("ok"))
                except (httpx.HTTPError, ValueError):
                    return False  # still starting

            wait_for(healthy, 180, "icd serve with a live worker", interval=0.5)
            spec = tiny_train_spec("served", iterations=5000, checkpoint_every=0)
            r = client.post("/jobs", json=spec)
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress_step"] > 0, 120, "training")
        tree = [serve.pid, *descendants(serve.pid)]
        assert len(tree) >= 2, "serve started no worker"
        serve.send_signal(sig)
        code = serve.wait(60)
        wait_for(lambda: not any(alive(p) for p in tree), 15, "every process of the tree to exit")
        if sig == signal.SIGKILL:
            assert code == -signal.SIGKILL
        else:
            assert code == 0, log.read_text()[-3000:]
            assert "stopping the local worker" in log.read_text()
    finally:
        for pid in [serve.pid, *tree]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
