"""Schemathesis over the OpenAPI document against a real `icd serve` on PostgreSQL: no 5xx, no
undocumented status code, content type or body (benchmarks/fuzz_api.py with few examples)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.postgres
def test_fuzzing_the_openapi_document_finds_no_5xx_and_nothing_undocumented(pg_database: Any) -> None:
    with pg_database() as url:
        run = subprocess.run(
            # A fixed seed: CI runs the same cases every time (a wider random run is benchmarks/fuzz_api.py).
            [
                sys.executable,
                str(REPO / "benchmarks" / "fuzz_api.py"),
                "--max-examples",
                "5",
                "--seed",
                "1",
                "--database-url",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
    assert run.stdout.strip(), run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["cases_generated"] and result["requests_served"] >= result["cases_generated"] // 2
    assert result["server_errors_5xx"] == 0, result
    assert result["failed_checks"] == {} and result["st_exit_code"] == 0, result["st_tail"]


def test_405_names_every_documented_method_of_the_path(client: Any) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for url, template in (("/jobs/1", "/jobs/{job_id}"), ("/jobs", "/jobs"), ("/health", "/health")):
        r = client.request("PUT", url)
        assert r.status_code == 405
        assert r.headers["allow"] == ", ".join(sorted(m.upper() for m in paths[template])), url
