"""Shared pieces of the scale benchmarks: a throwaway PostgreSQL database, an API server in subprocesses,
and latency percentiles. Everything stays on loopback; every database created here is dropped on exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]


def admin_connect(url: str | None = None) -> tuple[psycopg.Connection, str]:
    """An autocommit connection to a maintenance database, and the libpq URL that worked."""
    candidates = (
        [url]
        if url
        else [f"postgresql://{u}@127.0.0.1:5432/{d}" for u in ("postgres", "root") for d in ("postgres", "test")]
    )
    last: Exception | None = None
    for c in candidates:
        try:
            return psycopg.connect(c, autocommit=True, connect_timeout=3), c
        except Exception as exc:  # try the next user
            last = exc
    raise SystemExit(f"PostgreSQL unreachable: {last}")


@contextmanager
def scratch_database(admin_url: str | None, prefix: str, keep: str | None = None) -> Iterator[tuple[str, str]]:
    """(SQLAlchemy URL, libpq URL) of a new database, dropped afterwards; with keep=NAME, that database is
    reused if it exists (created otherwise) and kept, so a big dataset is built once and measured again."""
    admin, admin_url_used = admin_connect(admin_url)
    name = keep or f"{prefix}_{uuid.uuid4().hex[:8]}"
    exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    if not exists:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url_used.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://", 1), f"{base}/{name}"
    finally:
        if keep is None:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def api_server(database_url: str, workers: int = 1, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """`icd serve --no-worker --workers N` on a free loopback port; yields its base URL."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="icd-bench-")
    env = {
        **os.environ,
        "ICD_HOME": home,
        "ICD_DATABASE_URL": database_url,
        "PYTHONPATH": str(ROOT),
        **(extra_env or {}),
    }
    icd = Path(sys.executable).with_name("icd")  # the console script, wherever the CLI lives
    cmd = [
        str(icd),
        "serve",
        "--no-worker",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the API exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(f"{base}/version", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the API did not start within 60 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1)))))]
