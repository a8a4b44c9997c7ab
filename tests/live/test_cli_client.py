"""`icd submit | jobs | status | logs --follow | wait | download | cancel | retry` against a live server with a
real worker, run as a user runs them (a subprocess, the server from ICD_SERVER)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_train_spec
from tests.live.conftest import LiveService, wait_for, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(600)]


def icd(service: LiveService, *args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "icd_cli", *args],
        env=service.env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_wait_logs_download(live_service: LiveService, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "tiny.yaml", tiny_train_spec("cli-tiny", 6, every=3))
    r = icd(live_service, "submit", str(spec), "--wait")
    assert r.returncode == 0, r.stdout + r.stderr + live_service.tail()
    job_id = int(r.stdout.split()[1])
    assert f"{live_service.url}/#/jobs/{job_id}" in r.stdout
    assert f"job {job_id} succeeded" in r.stdout
    # One ETA and the job's own step time from the server; none of tqdm's own rate or remaining time,
    # which count from when the command attached.
    frames = [f for f in r.stderr.replace("\n", "\r").split("\r") if f.startswith(f"job {job_id}:")]
    assert frames and all(f.count("ETA") <= 1 and "step/s" not in f and "<" not in f for f in frames), frames

    listed = icd(live_service, "jobs", "--search", "cli-tiny")
    assert listed.returncode == 0 and f"{job_id}  succeeded" in listed.stdout
    status = icd(live_service, "status", str(job_id))
    assert "6/6 steps (100 %)" in status.stdout and re.search(r"^  eval +AP \d+\.\d\d · AP50", status.stdout, re.M)
    assert "{" not in status.stdout, status.stdout  # the final metrics are rounded lines, not one JSON line
    assert json.loads(icd(live_service, "status", str(job_id), "--json").stdout)["final_metrics"]["AP"] >= 0

    # A finished job's followed log is its whole log, and the stream ends by itself.
    logs = icd(live_service, "logs", str(job_id), "--follow", timeout=30)
    assert logs.returncode == 0, logs.stderr
    assert "attempt 1 starts" in logs.stdout and "resume requested" not in logs.stdout
    assert "step 6/6" in logs.stdout and "evaluation at step 3: AP=" in logs.stdout
    assert logs.stdout.rstrip().endswith(f"job {job_id} succeeded")

    # Download verifies the sha256; a partial file is resumed with a Range request.
    dl = icd(live_service, "download", str(job_id), "-o", str(tmp_path), cwd=tmp_path)
    assert dl.returncode == 0, dl.stderr
    final = tmp_path / "final.pt"
    expected = live_service.http.get(f"/jobs/{job_id}/checkpoints").json()
    ck = next(c for c in expected if c["final"])
    data = final.read_bytes()
    assert hashlib.sha256(data).hexdigest() == ck["sha256"] and len(data) == ck["size_bytes"]
    final.unlink()
    (tmp_path / "final.pt.part").write_bytes(data[: len(data) // 3])
    again = icd(live_service, "download", str(job_id), "final.pt", "-o", str(final))
    assert again.returncode == 0, again.stderr
    assert f"resuming at byte {len(data) // 3}" in again.stderr
    assert final.read_bytes() == data and not (tmp_path / "final.pt.part").exists()

    # A corrupt partial file is caught by the checksum, removed, and reported.
    final.unlink()
    (tmp_path / "final.pt.part").write_bytes(b"\0" * 1000)
    bad = icd(live_service, "download", str(job_id), "-o", str(final))
    assert bad.returncode == 1 and "sha256 mismatch" in bad.stderr and not (tmp_path / "final.pt.part").exists()


def test_follow_a_running_job_then_cancel_and_retry(live_service: LiveService, tmp_path: Path) -> None:
    spec = write_spec(tmp_path / "long.yaml", tiny_train_spec("cli-long", 2000, every=1000, lr=0.001))
    sub = icd(live_service, "submit", str(spec))
    assert sub.returncode == 0, sub.stderr
    job_id = int(sub.stdout.split()[1])
    follow = subprocess.Popen(
        [sys.executable, "-m", "icd_cli", "logs", str(job_id), "-f"],
        env=live_service.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: live_service.job(job_id)["progress_step"] >= 3, 240, f"job {job_id} to train a few steps")
        cancel = icd(live_service, "cancel", str(job_id))
        assert cancel.returncode == 0 and f"job {job_id}" in cancel.stdout, cancel.stderr
        waited = icd(live_service, "wait", str(job_id), "--interval", "0.5", timeout=240)
        assert waited.returncode == 2, waited.stdout + waited.stderr  # canceled
        assert f"job {job_id} canceled" in waited.stdout
        out, err = follow.communicate(timeout=60)  # the follow stream ends once the job is finished
    finally:
        if follow.poll() is None:
            follow.kill()
    assert follow.returncode == 0, err
    assert "attempt 1 starts" in out and f"job {job_id} canceled at step" in out

    retry = icd(live_service, "retry", str(job_id))
    assert retry.returncode == 0 and f"job {job_id} queued" in retry.stdout, retry.stderr
    cancel = icd(live_service, "cancel", str(job_id))  # leave the worker free for the next tests
    assert cancel.returncode == 0, cancel.stderr
    live_service.wait_status(job_id, {"canceled"}, timeout=240)
    log = live_service.http.get(f"/jobs/{job_id}/logs").text
    if "attempt 2" in log:
        assert "attempt 2 resumes" in log


def test_api_errors_print_field_and_reason(live_service: LiveService, tmp_path: Path) -> None:
    bad = tiny_train_spec("cli-bad", 4)
    bad["schedule"]["lr"] = -1
    bad["schedule"]["batchsize"] = 2
    r = icd(live_service, "submit", str(write_spec(tmp_path / "bad.yaml", bad)))
    assert r.returncode == 1
    assert "HTTP 422" in r.stderr
    assert "schedule.lr: Input should be greater than 0" in r.stderr
    assert "schedule.batchsize: Extra inputs are not permitted" in r.stderr
    bogus = icd(live_service, "jobs", "--status", "bogus")
    assert bogus.returncode == 1 and bogus.stderr == (
        "Error: --status: unknown status 'bogus'; valid statuses: waiting, queued, running, succeeded, failed, "
        "canceled, pruned\n"
    )
    missing = icd(live_service, "status", "999999")
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr and "job 999999 not found" in missing.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "icd_cli", "jobs", "--server", "http://127.0.0.1:9"],
        env=live_service.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unreachable.returncode == 1 and "cannot reach the service at http://127.0.0.1:9" in unreachable.stderr
