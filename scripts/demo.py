"""Demo client: submit a teacher job, an ICD student and a `none` student (the same student trained
without distillation, the baseline ICD must beat), watch them, print mAP.

It talks to a running service over HTTP only (what any user script would do):
    python scripts/demo.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"succeeded", "failed", "canceled"}


def wait_for_worker(client: httpx.Client, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health = client.get("/health").json()
            if health.get("status") == "ok":
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    sys.exit(f"no healthy service with a live worker at {client.base_url} after {timeout_s:.0f} s")


def submit(client: httpx.Client, spec: dict) -> dict:
    r = client.post("/jobs", json=spec)
    if r.status_code != 201:
        sys.exit(f"submit of {spec['name']} refused ({r.status_code}): {r.text}")
    return r.json()


def progress_line(job: dict) -> str:
    step, total = job.get("progress_step") or 0, job.get("progress_total") or 0
    pct = 100 * step / total if total else 0
    eta = job.get("eta_s")
    eta_txt = f" ETA {eta:4.0f}s" if eta is not None and job["status"] == "running" else ""
    return f"#{job['id']} {job['name']:<24} {job['status']:<9} {step:>4}/{total:<4} {pct:5.1f}%{eta_txt}"


def watch(client: httpx.Client, ids: list[int]) -> dict[int, dict]:
    jobs: dict[int, dict] = {}
    while True:
        jobs = {i: client.get(f"/jobs/{i}").json() for i in ids}
        line = " | ".join(progress_line(j) for j in jobs.values())
        print("\r" + line[:200], end="", flush=True)
        if all(j["status"] in TERMINAL for j in jobs.values()):
            print()
            return jobs
        time.sleep(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--teacher", default=str(ROOT / "examples/teacher_shapes.yaml"))
    ap.add_argument("--student", default=str(ROOT / "examples/distill_shapes.yaml"))
    ap.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        help="skip the `none` student (about 2 minutes on 2 CPU cores)",
    )
    args = ap.parse_args()

    with httpx.Client(base_url=args.url, timeout=30) as client:
        wait_for_worker(client)
        teacher_spec = yaml.safe_load(Path(args.teacher).read_text())
        student_spec = yaml.safe_load(Path(args.student).read_text())
        teacher = submit(client, teacher_spec)
        student_spec["teacher"]["checkpoint"] = f"job:{teacher['id']}"
        student = submit(client, student_spec)
        ids = [teacher["id"], student["id"]]
        baseline = None
        if args.baseline:
            none_spec = {**student_spec, "name": student_spec["name"].split("-icd")[0] + "-none"}
            none_spec["distill"] = {**student_spec["distill"], "method": "none"}
            baseline = submit(client, none_spec)
            ids.append(baseline["id"])
        print(
            f"submitted teacher job {teacher['id']}, ICD student job {student['id']}"
            + (f" and the none student job {baseline['id']}" if baseline else "")
            + " (the students wait for the teacher's checkpoint)"
        )
        jobs = watch(client, ids)

        width = max(len(job["name"]) for job in jobs.values())
        print(f"\n{'job':<{width}} {'status':<10} {'AP':>6} {'AP50':>6} {'AP75':>6}")
        for job in jobs.values():
            m = job.get("final_metrics") or {}
            ap_ = [f"{m[k]:6.1f}" if k in m else "     -" for k in ("AP", "AP50", "AP75")]
            print(f"{job['name']:<{width}} {job['status']:<10} {' '.join(ap_)}")
            if job["status"] == "failed":
                print(f"  error: {job.get('error')}")
        if baseline is not None:
            icd_ap = (jobs[student["id"]].get("final_metrics") or {}).get("AP")
            none_ap = (jobs[baseline["id"]].get("final_metrics") or {}).get("AP")
            if icd_ap is not None and none_ap is not None:
                print(f"ICD student - none student: {icd_ap - none_ap:+.1f} AP")
        ckpts = client.get(f"/jobs/{student['id']}/checkpoints").json()
        final = [c["name"] for c in ckpts if c.get("final")]
        if final:
            print(f"\nstudent checkpoint: {args.url}/jobs/{student['id']}/checkpoints/{final[0]}")
        print(f"docs UI: {args.url}/docs   dashboard: {args.url}/")
        if any(j["status"] != "succeeded" for j in jobs.values()):
            sys.exit(1)


if __name__ == "__main__":
    main()
