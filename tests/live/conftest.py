"""A live service for the client-side tests (command-line client, browser): the API as a real HTTP server
(`icd serve --no-worker` on a free loopback port) and a real `celery worker` on Redis, sharing a SQLite
database and an artifact folder in a temporary directory. Jobs are tiny shapes runs on the CPU.

Redis database: ICD_TEST_REDIS_DB (flushed at the start), so checkouts can run side by side.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import (
    IN_CI,
    REPO,
    flushed_redis_url,
    free_port,
    stop_process,
    wait_for,
)
from worker.supervisor import WorkerSpec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@dataclass
class LiveService:
    url: str
    http: httpx.Client
    env: dict[str, str]  # the environment a client command needs (ICD_SERVER, PYTHONPATH)
    logs: Path

    def job(self, job_id: int) -> dict[str, Any]:
        return self.http.get(f"/jobs/{job_id}").json()

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        r = self.http.post("/jobs", json=spec)
        assert r.status_code == 201, r.text
        return r.json()

    def wait_status(self, job_id: int, statuses: set[str], timeout: float = 300) -> dict[str, Any]:
        return wait_for(
            lambda: (j := self.job(job_id))["status"] in statuses and j,
            timeout,
            f"job {job_id} to reach {sorted(statuses)}",
        )

    def tail(self) -> str:
        logs = sorted(self.logs.glob("*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)


@pytest.fixture(scope="package")
def live_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    from store.db import upgrade_database

    tmp = tmp_path_factory.mktemp("live")
    db_url = f"sqlite:///{tmp / 'icd.db'}"
    upgrade_database(db_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICD_")}
    env.update(
        ICD_HOME=str(tmp / "home"),
        ICD_DATABASE_URL=db_url,
        ICD_BROKER_URL=flushed_redis_url(),
        ICD_WORKER_HEARTBEAT_S="1",
        PYTHONPATH=str(REPO),
        OMP_NUM_THREADS="1",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    icd = [sys.executable, "-m", "icd_cli"]
    with open(tmp / "api.log", "wb") as api_log, open(tmp / "worker.log", "wb") as worker_log:
        api = subprocess.Popen(
            [*icd, "serve", "--no-worker", "--port", str(port), "--log-level", "warning"],
            cwd=tmp,
            env=env,
            stdout=api_log,
            stderr=subprocess.STDOUT,
        )
        worker = subprocess.Popen(
            WorkerSpec(name="live@localhost", queues="cpu,any", loglevel="INFO").command(),
            cwd=REPO,
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
        )
    http = httpx.Client(base_url=url, timeout=30)
    service = LiveService(url, http, {**env, "ICD_SERVER": url}, tmp)
    try:

        def up() -> bool:
            if api.poll() is not None or worker.poll() is not None:
                raise AssertionError(f"the service exited:\n{service.tail()}")
            try:
                return bool(http.get("/workers").json())
            except httpx.TransportError:
                return False

        wait_for(up, 120, "the API and a live worker")
        yield service
    finally:
        http.close()
        stop_process(api, signal.SIGINT)
        stop_process(worker)


# --- a headless Chromium (Debian's chromium + chromium-driver; never a downloaded browser) --------------

CHROMIUM = os.environ.get("ICD_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("ICD_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = REPO / "test-artifacts"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the test item, so the browser fixture knows whether the test failed."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def browser(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A headless Chromium that can reach loopback only; on failure its screenshot, page source and console
    log are saved under test-artifacts/ (ignored by git)."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        msg = f"no {CHROMIUM} / {CHROMEDRIVER}: apt-get install chromium chromium-driver"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1600",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--no-proxy-server",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            ARTIFACTS.mkdir(exist_ok=True)
            stem = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name)
            driver.save_screenshot(f"{stem}.png")
            Path(f"{stem}.html").write_text(driver.page_source)
            Path(f"{stem}.console.txt").write_text("\n".join(str(e) for e in driver.get_log("browser")))
        driver.quit()
