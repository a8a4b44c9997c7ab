"""Locust users of the ICD API (run by benchmarks/load_test.py; usable alone with `locust -f`).

A dashboard user lists and scrolls jobs, opens one, polls its metrics and fetches its downsampled
curves; now and then one submits a job. Job ids to read come from ICD_LOAD_JOB_IDS (comma-separated).
"""

from __future__ import annotations

import os
import random

from locust import HttpUser, between, task

JOB_IDS = [int(x) for x in os.environ.get("ICD_LOAD_JOB_IDS", "1").split(",")]
BIG_JOB = int(os.environ.get("ICD_LOAD_BIG_JOB", str(JOB_IDS[0])))
SUBMIT = {
    "name": "load-test",
    "kind": "train",
    "data": {
        "train": {"format": "shapes", "num_images": 16, "image_size": 64},
        "val": {"format": "shapes", "num_images": 8, "image_size": 64},
        "min_size": 64,
        "max_size": 64,
    },
    "model": {"detector": "retinanet", "backbone": "resnet18"},
    "schedule": {"iterations": 10, "batch_size": 2},
    "device": "cpu",
}


class DashboardUser(HttpUser):
    wait_time = between(0.05, 0.2)

    @task(5)
    def list_jobs(self) -> None:
        self.client.get("/jobs?limit=50", name="GET /jobs?limit=50")

    @task(3)
    def scroll(self) -> None:
        page = self.client.get("/jobs?limit=50&status=succeeded", name="GET /jobs?status=succeeded").json()
        for _ in range(3):
            if not page.get("next_cursor"):
                break
            page = self.client.get(
                f"/jobs?limit=50&status=succeeded&cursor={page['next_cursor']}", name="GET /jobs?cursor=…"
            ).json()

    @task(3)
    def job_detail(self) -> None:
        self.client.get(f"/jobs/{random.choice(JOB_IDS)}", name="GET /jobs/{id}")

    @task(4)
    def poll_metrics(self) -> None:
        self.client.get(
            f"/jobs/{random.choice(JOB_IDS)}/metrics?since_step=1900", name="GET /jobs/{id}/metrics?since_step"
        )

    @task(2)
    def curves(self) -> None:
        self.client.get(
            f"/jobs/{BIG_JOB}/metrics?names=loss&max_points=1000",
            name="GET /jobs/{id}/metrics?max_points=1000 (1M points)",
        )

    @task(1)
    def submit(self) -> None:
        self.client.post("/jobs", json=SUBMIT, name="POST /jobs")
