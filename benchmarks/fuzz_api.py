"""Schemathesis over the API's own OpenAPI document, against a real `icd serve` on PostgreSQL (issue 9).

Creates a fresh PostgreSQL database, starts `icd serve --no-worker` on a free loopback port (embedded
SQLite broker, so no queue outside the run is touched), creates an admin token and sends it, then runs
`st run` with bounded examples. Prints the case count schemathesis generated, the requests the server
answered and how many were 5xx (counted from the server's own access log), and each failed check.
Exit status 0 means no 5xx and no failed check. The database is dropped afterwards.

    .venv/bin/python benchmarks/fuzz_api.py [--max-examples 60] [--checks all] [--require-token] \
        [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What the issue asks of the API: no 5xx, only documented status codes, bodies and content types as documented.
DEFAULT_CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
_ACCESS = re.compile(r'"[A-Z]+ [^"]*" (\d{3})')


def admin_connect(url: str | None) -> tuple[psycopg.Connection, str]:
    """An autocommit connection to the server's maintenance database, and the role that worked."""
    candidates = (
        [url]
        if url
        else [f"postgresql://{u}@127.0.0.1:5432/{d}" for u in ("postgres", "root") for d in ("postgres", "test")]
    )
    last: Exception | None = None
    for cand in candidates:
        try:
            conn = psycopg.connect(cand, autocommit=True, connect_timeout=3)
            return conn, conn.info.user
        except psycopg.Error as exc:
            last = exc
    raise SystemExit(f"PostgreSQL unreachable: {last}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(base: str, proc: subprocess.Popen[bytes], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"icd serve exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("icd serve did not answer /health in time")


@contextmanager
def serving(env: dict[str, str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`icd serve --no-worker` on a free loopback port with `env`, healthy: (base URL, process); stopped after."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [str(BIN / "icd"), "serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(base, server)
            yield base, server
        finally:
            server.terminate()
            server.wait(timeout=30)


def run_fuzz(
    max_examples: int,
    checks: str,
    admin_url: str | None,
    workers: int = 1,
    database_url: str | None = None,
    require_token: bool = False,
    seed: int | None = None,
) -> dict[str, object]:
    """One schemathesis run against a fresh server; on `database_url` (empty) when given, else on a
    database created and dropped here. require_token: anonymous requests get 401 even on loopback
    (what a server beyond loopback does), so the auth checks of `--checks all` apply."""
    admin = None
    if database_url is None:
        admin, user = admin_connect(admin_url)
        dbname = f"icd_fuzz_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{dbname}"')
        database_url = f"postgresql+psycopg://{user}@127.0.0.1:5432/{dbname}"
    try:
        with tempfile.TemporaryDirectory(prefix="icd-fuzz-") as tmp:
            env = {
                **os.environ,
                "ICD_HOME": f"{tmp}/home",
                "ICD_DATA_ROOTS": f"{tmp}/data",
                "ICD_DATABASE_URL": database_url,
                "ICD_BROKER_URL": f"sqla+sqlite:///{tmp}/broker.db",
                "OMP_NUM_THREADS": "1",
            }
            env.pop("ICD_API_TOKEN", None)
            env["ICD_REQUIRE_TOKEN"] = "1" if require_token else "0"
            Path(f"{tmp}/data").mkdir()
            # `follow=true` streams a log until its job ends; no worker runs here, so it would never end.
            config = Path(tmp) / "schemathesis.toml"
            config.write_text('[parameters]\n"query.follow" = false\n')
            subprocess.run([str(BIN / "icd"), "db", "upgrade"], env=env, check=True, capture_output=True)
            made = subprocess.run(
                [str(BIN / "icd"), "token", "create", "--name", "fuzz", "--admin"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            )
            secret = made.stdout.strip().splitlines()[0]
            log_path = Path(tmp) / "serve.log"
            with serving(env, log_path) as (base, _server):
                started = time.perf_counter()
                command = [
                    str(BIN / "st"),
                    "--config-file",
                    str(config),
                    "run",
                    f"{base}/openapi.json",
                    "--max-examples",
                    str(max_examples),
                    "--checks",
                    checks,
                    "-w",
                    str(workers),
                    "-H",
                    f"Authorization: Bearer {secret}",
                    "--no-color",
                    "--generation-database",
                    "none",
                    "--request-timeout",
                    "60",
                    *(["--seed", str(seed)] if seed is not None else []),
                ]
                st = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp)
                elapsed = time.perf_counter() - started
            statuses = Counter(int(m.group(1)) for m in _ACCESS.finditer(log_path.read_text(errors="replace")))
    finally:
        if admin is not None:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            admin.close()
    generated = re.search(r"(\d+) generated", st.stdout)
    failures = dict(re.findall(r"❌ (ST\d+ [^:]+): (\d+)", st.stdout))
    return {
        "max_examples": max_examples,
        "checks": checks,
        "require_token": require_token,
        "seed": seed,
        "cases_generated": int(generated.group(1)) if generated else None,
        "requests_served": sum(statuses.values()),
        "server_errors_5xx": sum(n for code, n in statuses.items() if code >= 500),
        "status_counts": dict(sorted(statuses.items())),
        "failed_checks": {k: int(v) for k, v in failures.items()},
        "st_exit_code": st.returncode,
        "seconds": round(elapsed, 1),
        "st_tail": st.stdout[-3000:] if st.returncode else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-examples", type=int, default=60)
    ap.add_argument("--checks", default=DEFAULT_CHECKS, help="schemathesis checks (or 'all')")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--admin-url", default=None)
    ap.add_argument("--database-url", default=None, help="an empty database to use instead of a fresh one")
    ap.add_argument("--require-token", action="store_true", help="anonymous requests get 401 (ICD_REQUIRE_TOKEN)")
    ap.add_argument("--seed", type=int, default=None, help="schemathesis's seed: the same cases every run (CI)")
    args = ap.parse_args()
    result = run_fuzz(
        args.max_examples, args.checks, args.admin_url, args.workers, args.database_url, args.require_token, args.seed
    )
    print(json.dumps(result, indent=2))
    sys.exit(
        0 if result["server_errors_5xx"] == 0 and not result["failed_checks"] and result["st_exit_code"] == 0 else 1
    )


if __name__ == "__main__":
    main()
