"""resources.gpus end to end: real Celery workers on Redis (ICD_TEST_REDIS_DB), real torchrun groups.

CPU workers pretend to own GPUs through ICD_WORKER_GPUS: the 2-"GPU" worker consumes cpu-g2/any-g2
and runs the job as 2 gloo processes. A 1-GPU worker never takes a 2-GPU job (queue routing); a
killed rank fails the attempt with a message naming it, and no process of the group survives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, TINY_MODEL, service_env, stop_process, tiny_data, wait_for
from tests.helpers import flushed_redis_url as redis_url
from tests.service.test_worker_e2e import wait_status
from worker.supervisor import WorkerSpec

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(900)]

MODEL = {**TINY_MODEL, "norm": "gn"}
DATA = tiny_data()


def group_spec(iterations: int = 4, gpus: int = 2) -> dict[str, Any]:
    return {
        "kind": "train",
        "name": f"ddp-{gpus}",
        "device": "cpu",
        "data": DATA,
        "model": dict(MODEL),
        "resources": {"gpus": gpus},
        "schedule": {
            "iterations": iterations,
            "batch_size": 4,
            "lr": 0.01,
            "warmup_iters": 0,
            "eval_every": 0,
            "checkpoint_every": 2,
            "log_every": 1,
        },
    }


class Stack:
    """The API (TestClient) and the workers started so far; the 2-GPU worker starts on demand."""

    def __init__(self, client: Any, tmp: Path, env: dict[str, str]):
        self.client = client
        self.tmp = tmp
        self.env = env
        self.procs: list[subprocess.Popen[bytes]] = []
        self.by_name: dict[str, subprocess.Popen[bytes]] = {}

    def start_worker(self, name: str, gpus: int) -> None:
        from store.dispatch import group_queues

        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process's life
        env = {**self.env, "ICD_WORKER_GPUS": str(gpus), "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(
            WorkerSpec(name=f"{name}@localhost", queues=group_queues("cpu,any", gpus), loglevel="INFO").command(),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        self.by_name[name] = proc
        wait_for(
            lambda: any(w["name"] == f"{name}@localhost" for w in self.client.get("/workers").json()),
            120,
            f"worker {name}",
        )

    def ensure_worker(self, name: str, gpus: int) -> None:
        proc = self.by_name.get(name)
        if proc is None or proc.poll() is not None:
            self.start_worker(name, gpus)

    def job_dir(self, job_id: int) -> Path:
        from store.artifacts import ArtifactStore

        return ArtifactStore(self.tmp / "home" / "artifacts").job_dir(job_id)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from fastapi.testclient import TestClient

    from api.main import create_app
    from store.settings import Settings

    tmp = tmp_path_factory.mktemp("ddp_redis")
    broker = redis_url()
    env = service_env(
        tmp, ICD_DATABASE_URL=f"sqlite:///{tmp / 'icd.db'}", ICD_BROKER_URL=broker, ICD_REDELIVER_AFTER_S="2"
    )
    settings = Settings(
        home=tmp / "home",
        database_url=env["ICD_DATABASE_URL"],
        broker_url=broker,
        worker_heartbeat_s=1.0,
        auto_migrate=True,
    )
    app = create_app(settings)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with TestClient(app) as client:
            s = Stack(client, tmp, env)
            procs = s.procs
            s.start_worker("one", 1)
            yield s
    finally:
        for proc in procs:
            stop_process(proc)
        app.state.engine.dispose()


def group_pids(job_dir: Path) -> list[int]:
    """Live processes whose command line names this job's folder (torchrun and its ranks)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(job_dir).encode() in cmdline:
                pids.append(int(proc.name))
    return pids


def test_a_two_gpu_job_waits_for_a_two_gpu_worker_and_runs_as_two_ranks(stack: Stack) -> None:
    client = stack.client
    assert [w["gpus"] for w in client.get("/workers").json()] == [1]
    r = client.post("/jobs", json=group_spec())
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["queue"] == "cpu-g2"
    time.sleep(6)  # three re-delivery periods of the idle 1-GPU worker: it must not take the job
    assert client.get(f"/jobs/{job['id']}").json()["status"] == "queued"

    stack.start_worker("two", 2)
    assert {w["name"]: w["gpus"] for w in client.get("/workers").json()} == {"one@localhost": 1, "two@localhost": 2}
    done = wait_status(client, job["id"], {"succeeded"}, timeout=400)
    assert done["worker"] == "two@localhost" and done["progress_step"] == done["progress_total"] == 4
    assert [st for st, _ in client.get(f"/jobs/{job['id']}/metrics").json()["series"]["loss"]] == [1, 2, 3, 4]
    assert [e["step"] for e in client.get(f"/jobs/{job['id']}/evaluations").json()] == [4]
    assert [c["step"] for c in client.get(f"/jobs/{job['id']}/checkpoints").json() if c["final"]] == [4]
    log = client.get(f"/jobs/{job['id']}/logs").text
    assert "rank 1" in log and "2-rank torchrun group" in log
    assert group_pids(stack.job_dir(job["id"])) == []


def test_refused_at_submit_when_the_batch_does_not_divide(stack: Stack) -> None:
    spec = group_spec()
    spec["schedule"]["batch_size"] = 3
    r = stack.client.post("/jobs", json=spec)
    assert r.status_code == 422 and "resources.gpus" in r.text


def test_killing_one_rank_fails_the_attempt_and_leaves_no_process(stack: Stack) -> None:
    client = stack.client
    stack.ensure_worker("two", 2)
    job_id = client.post("/jobs", json=group_spec(iterations=5000)).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress_step"] > 0, 300, "the group to train")
    job_dir = stack.job_dir(job_id)
    rank1 = int((job_dir / "group" / "rank-1.pid").read_text())
    os.kill(rank1, signal.SIGKILL)

    job = wait_status(client, job_id, {"failed"}, timeout=120)
    assert "rank 1" in job["error"] and "SIGKILL" in job["error"], job["error"]
    wait_for(lambda: group_pids(job_dir) == [], 30, "every process of the group to end")
    wait_for(lambda: all(w["current_job_id"] is None for w in client.get("/workers").json()), 30, "idle workers")
    time.sleep(2)
    assert client.get(f"/jobs/{job_id}").json()["status"] == "failed"  # settled, not left running


def test_cancel_reaches_every_rank(stack: Stack) -> None:
    client = stack.client
    stack.ensure_worker("two", 2)
    job_id = client.post("/jobs", json=group_spec(iterations=5000)).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress_step"] > 0, 300, "the group to train")
    assert client.post(f"/jobs/{job_id}/cancel").status_code == 200
    job = wait_status(client, job_id, {"canceled"}, timeout=120)
    assert job["progress_step"] < 5000
    assert [c for c in client.get(f"/jobs/{job_id}/checkpoints").json() if c["step"] > 0 and not c["final"]]
    wait_for(lambda: group_pids(stack.job_dir(job_id)) == [], 30, "every process of the group to end")


def test_worker_shutdown_requeues_the_group_job_which_resumes_on_the_next_worker(stack: Stack) -> None:
    client = stack.client
    stack.ensure_worker("two", 2)
    total = 30
    job_id = client.post("/jobs", json=group_spec(iterations=total)).json()["id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json()["progress_step"] >= 3, 300, "the group to train")
    assert stop_process(stack.by_name["two"]) == 0  # warm shutdown: the group checkpoints and stops
    job = client.get(f"/jobs/{job_id}").json()
    log_tail = client.get(f"/jobs/{job_id}/logs").text[-3000:]
    why = f"{job['status']} at step {job['progress_step']}: {job['error']}\n{log_tail}"
    assert job["status"] == "queued" and 3 <= job["progress_step"] < total, why
    assert group_pids(stack.job_dir(job_id)) == []

    stack.start_worker("two", 2)
    done = wait_status(client, job_id, {"succeeded"}, timeout=400)
    assert done["attempt"] == 2 and done["progress_step"] == total
    steps = [st for st, _ in client.get(f"/jobs/{job_id}/metrics").json()["series"]["loss"]]
    assert steps == list(range(1, total + 1))
    assert "resumed from" in client.get(f"/jobs/{job_id}/logs").text
