"""Demo client: submit a study — a teacher it trains first, then the `none` student (the same student trained
without distillation, the baseline) and the ICD student, on two seeds — watch it, and print its leaderboard
and its one-sentence verdict.

It talks to a running service over HTTP only (what any user script would do):
    python scripts/demo.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = {"succeeded", "failed", "canceled", "pruned"}


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
    return f"#{job['id']} {job['name']:<28} {job['status']:<9} {step:>4}/{total:<4} {pct:5.1f}%{eta_txt}"


def watch(client: httpx.Client, study_id: int) -> tuple[dict, list[dict]]:
    """Poll the study and its children until the study ends; one status line for what is running now."""
    while True:
        study = client.get(f"/jobs/{study_id}").json()
        children = client.get("/jobs", params={"parent_id": study_id, "limit": 100}).json()["items"]
        running = [c for c in children if c["status"] == "running"] or children[-1:]
        done = sum(c["status"] in TERMINAL for c in children)
        line = f"study #{study_id} {study['status']:<9} {done}/{len(children)} runs done | " + " | ".join(
            progress_line(c) for c in running
        )
        print("\r" + line[:200].ljust(200), end="", flush=True)
        if study["status"] in TERMINAL:
            print()
            return study, sorted(children, key=lambda c: c["id"])
        time.sleep(2)


def _fmt(v: Any, spec: str = "5.1f") -> str:
    return format(v, spec) if isinstance(v, int | float) else "–"


def print_leaderboard(report: dict) -> None:
    teacher = report.get("teacher") or {}
    print(f"\n{'row':<24} {'seeds':>5} {'AP':>12} {'paired Δ AP vs none (95 % CI)':>32} {'ms':>6}")
    t_ms = (teacher.get("model_cost") or {}).get("latency_ms")
    print(f"{'teacher':<24} {'–':>5} {_fmt(teacher.get('AP')):>12} {'':>32} {_fmt(t_ms, '6.1f'):>6}")
    for m in report["methods"]:
        ap = f"{m['AP']['mean']:.1f} ± {m['AP']['std']:.1f}" if m["n"] else "–"
        p = m.get("paired_delta_AP")
        delta = "–"
        if p and p.get("ci_low") is not None:
            delta = f"{p['mean']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]"
        elif p:
            delta = f"{p['mean']:+.1f} (one seed)"
        ms = (m.get("model_cost") or {}).get("latency_ms")
        print(f"{m['method'][:24]:<24} {m['n']:>5} {ap:>12} {delta:>32} {_fmt(ms, '6.1f'):>6}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--study", default=str(ROOT / "examples/study_shapes.yaml"))
    args = ap.parse_args()

    with httpx.Client(base_url=args.url, timeout=30) as client:
        wait_for_worker(client)
        study = submit(client, yaml.safe_load(Path(args.study).read_text()))
        print(f"submitted study job {study['id']}: it trains the teacher, then the `none` and ICD students")
        study, children = watch(client, study["id"])
        for child in children:
            if child["status"] != "succeeded":
                print(f"  #{child['id']} {child['name']} {child['status']}: {child.get('error') or ''}")
        if study["status"] != "succeeded":
            print(f"study {study['status']}: {study.get('error')}")
            sys.exit(1)
        report = client.get(f"/jobs/{study['id']}/report").json()
        print_leaderboard(report)
        print(f"\nVerdict: {report['verdict']}")
        icd = next((c for c in children if c["kind"] == "distill" and "/icd/" in c["name"]), None)
        if icd is not None:
            ckpts = client.get(f"/jobs/{icd['id']}/checkpoints").json()
            final = [c["name"] for c in ckpts if c.get("final")]
            if final:
                print(f"\nICD student checkpoint: {args.url}/jobs/{icd['id']}/checkpoints/{final[0]}")
        print(f"report: {args.url}/jobs/{study['id']}/report.md   docs UI: {args.url}/docs   dashboard: {args.url}/")


if __name__ == "__main__":
    main()
