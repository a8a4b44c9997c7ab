"""Real processes to break: `icd worker` processes on Redis and PostgreSQL, the API in-process, a
private redis-server, and the faults themselves (kill -9 of a worker's whole process group or of its
Celery child only, SIGTERM, a broker restart, a kill inside a checkpoint write).

Shared by the fault tests (`tests/service/test_faults.py`) and `benchmarks/fault_injection.py`.
Lease timeouts are a few seconds here, so a lost worker is noticed within seconds.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import helpers
from tests.helpers import free_port, tiny_data, wait_for

REPO = Path(__file__).resolve().parents[2]
PG_HOST = os.environ.get("ICD_TEST_PG_HOST", "127.0.0.1:5432")
HOST = socket.gethostname()

DATA = tiny_data(val_images=4)


def tiny_train_spec(name: str, iterations: int = 60, checkpoint_every: int = 10, **extra: Any) -> dict[str, Any]:
    """A CPU training job of a few seconds that logs every step and checkpoints every few."""
    spec = helpers.tiny_train_spec(
        name, iterations, data=DATA, lr=0.005, grad_clip=1.0, eval_every=0, checkpoint_every=checkpoint_every
    )
    return {**spec, **extra}


def icd_command() -> list[str]:
    """The installed `icd` console script beside this interpreter (what an operator runs)."""
    script = Path(sys.executable).with_name("icd")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from icd_cli import main; main()"]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc), children first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = []
        # Each thread's children are listed under its own task (a supervisor thread restarts workers).
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids += [int(x) for x in (task / "children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
        out += kids
        todo += kids
    return out


def alive(pid: int) -> bool:
    """True for a process that exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


# --- servers --------------------------------------------------------------------------------------


def _pg_admin_connection() -> tuple[Any, str]:
    """An autocommit connection to the maintenance database, and the role that worked."""
    import psycopg

    for user in ("postgres", "root"):
        try:
            return psycopg.connect(f"postgresql://{user}@{PG_HOST}/postgres", autocommit=True, connect_timeout=3), user
        except Exception:
            continue
    raise ConnectionError(f"PostgreSQL at {PG_HOST} unreachable")


@contextmanager
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database (random name), dropped afterwards, on a new connection: the server may
    have been restarted meanwhile (benchmarks/attack_probe.py --restart-postgres does)."""
    admin, user = _pg_admin_connection()
    name = f"icd_fault_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{user}@{PG_HOST}/{name}"
    finally:
        admin, _ = _pg_admin_connection()
        with admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class PrivateRedis:
    """A redis-server of our own on a free port (never the shared one), restartable on that port."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        wait_for(lambda: _pings(redis, self.url), 20, f"redis-server on port {self.port}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


def _pings(redis: Any, url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


# --- the stack ------------------------------------------------------------------------------------


@dataclass
class Stack:
    """The API (in-process, with its reaper) and any number of `icd worker --cpu` processes."""

    tmp: Path
    database_url: str
    broker_url: str
    lease_s: float = 3.0
    heartbeat_s: float = 0.5
    reaper_s: float = 0.5
    extra_env: dict[str, str] = field(default_factory=dict)
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    client: Any = None
    _app: Any = None
    _client_cm: Any = None

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ICD_")}
        env.update(
            ICD_HOME=str(self.tmp / "home"),
            ICD_DATABASE_URL=self.database_url,
            ICD_BROKER_URL=self.broker_url,
            ICD_WORKER_HEARTBEAT_S=str(self.heartbeat_s),
            ICD_LEASE_TIMEOUT_S=str(self.lease_s),
            ICD_REAPER_INTERVAL_S=str(self.reaper_s),
            ICD_REDELIVER_AFTER_S="3",
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
            **self.extra_env,
            **extra,
        )
        return env

    def start_api(self) -> Any:
        from fastapi.testclient import TestClient

        from api.main import create_app
        from store.settings import Settings

        settings = Settings(
            home=self.tmp / "home",
            database_url=self.database_url,
            broker_url=self.broker_url,
            worker_heartbeat_s=self.heartbeat_s,
            lease_timeout_s=self.lease_s,
            reaper_interval_s=self.reaper_s,
            auto_migrate=True,
        )
        self._app = create_app(settings)
        self._client_cm = TestClient(self._app)
        self.client = self._client_cm.__enter__()
        return self.client

    def start_worker(self, name: str, queues: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        """`icd worker --cpu --name NAME` in its own process group (its name becomes NAME@host)."""
        log = open(self.tmp / f"worker-{name}.log", "ab")  # noqa: SIM115 - closed with the process
        queue_args = ["-Q", queues] if queues else []
        proc = subprocess.Popen(
            [*icd_command(), "worker", "--cpu", "--name", name, "--stop-grace", "30", *queue_args],
            cwd=REPO,
            env=self.env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.workers[name] = proc
        return proc

    def wait_workers_alive(self, *names: str, timeout: float = 120) -> None:
        want = {f"{n}@{HOST}" for n in names}

        def up() -> bool:
            for n, p in self.workers.items():
                if n in names and p.poll() is not None:
                    raise AssertionError(f"worker {n} exited:\n{self.log(n)[-3000:]}")
            return want <= {w["name"] for w in self.client.get("/workers").json()}

        wait_for(up, timeout, f"workers {sorted(want)} to beat")

    def log(self, name: str) -> str:
        path = self.tmp / f"worker-{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def celery_child(self, name: str) -> int:
        """The Celery process below `icd worker` (the one that trains)."""
        proc = self.workers[name]
        return wait_for(lambda: next(iter(descendants(proc.pid)), None), 60, f"the Celery child of {name}")

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        """The whole worker: `icd worker` and its Celery child (which leads a session of its own)."""
        proc = self.workers[name]
        tree = [proc.pid, *descendants(proc.pid)]
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            proc.wait(10)
            wait_for(lambda: not any(alive(p) for p in tree), 10, f"worker {name} to die")

    def submit(self, spec: dict[str, Any]) -> int:
        r = self.client.post("/jobs", json=spec)
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    def job(self, job_id: int) -> dict[str, Any]:
        return self.client.get(f"/jobs/{job_id}").json()

    def loss_steps(self, job_id: int) -> list[int]:
        return [
            st
            for st, _ in self.client.get(f"/jobs/{job_id}/metrics", params={"names": "loss"})
            .json()["series"]
            .get("loss", [])
        ]

    def wait_step(self, job_id: int, at_least: int, timeout: float = 120) -> dict[str, Any]:
        def far() -> dict[str, Any] | None:
            j = self.job(job_id)
            if j["status"] in ("succeeded", "failed", "canceled"):
                raise AssertionError(f"job {job_id} ended {j['status']} early: {j['error']}")
            return j if j["status"] == "running" and j["progress_step"] >= at_least else None

        return wait_for(far, timeout, f"job {job_id} to pass step {at_least}")

    def wait_end(self, job_id: int, timeout: float = 180) -> dict[str, Any]:
        return wait_for(
            lambda: (j := self.job(job_id))["status"] in ("succeeded", "failed", "canceled") and j,
            timeout,
            f"job {job_id} to end",
        )

    def stop_worker(self, name: str) -> None:
        """Stop one worker this stack started (by pid): SIGTERM, then SIGKILL for what is left."""
        proc = self.workers.pop(name)
        tree = [proc.pid, *descendants(proc.pid)]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                pass
        for pid in tree:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            proc.wait(10)

    def close(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        if self._client_cm is not None:
            self._client_cm.__exit__(None, None, None)
            self._app.state.engine.dispose()


@contextmanager
def stack(tmp: Path, database_url: str, broker_url: str, **kw: Any) -> Iterator[Stack]:
    st = Stack(tmp, database_url, broker_url, **kw)
    try:
        st.start_api()
        yield st
    finally:
        st.close()
