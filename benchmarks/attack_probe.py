"""The hand-made attack cases of issue 23, re-run against a real `icd serve --no-worker` on PostgreSQL.

Owner bypass by artifact path (every checkpoint field and `distill.icd.decoder`), unconfined decoder
paths, a YAML alias bomb (time to the answer and the server's resident memory before and after), deep
nesting, non-finite floats, lone surrogates, the values that used to be accepted and fail later, and
what a non-admin can read of other owners (/workers, anonymous /health). Each case prints its status,
the status it must have, and the time the server took. Exit status 1 when any case is answered
otherwise or any answer is a 5xx.

    .venv/bin/python benchmarks/attack_probe.py [--out benchmarks/results/attack_probe-DATE.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from helpers import succeed_with_checkpoint  # noqa: E402
from service.fault_harness import pg_database  # noqa: E402

from api.docs import DISTILL_EXAMPLE, TRAIN_EXAMPLE  # noqa: E402
from benchmarks.fuzz_api import serving  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def alias_bomb(levels: int, fan: int = 10) -> str:
    lines = ['a0: &a0 ["x"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


class Probe:
    def __init__(self, base: str, tokens: dict[str, str]) -> None:
        self.base, self.tokens, self.rows, self.bad = base, tokens, [], 0

    def send(self, what: str, expect: set[int], method: str, url: str, who: str | None = "bob", **kw: Any) -> Any:
        headers = dict(kw.pop("headers", {}))
        if who:
            headers["Authorization"] = f"Bearer {self.tokens[who]}"
        t0 = time.perf_counter()
        r = httpx.request(method, self.base + url, headers=headers, timeout=120, **kw)
        ms = (time.perf_counter() - t0) * 1000
        ok = r.status_code in expect  # a 5xx only where the case expects one (503 during an outage)
        self.bad += not ok
        self.rows.append((what, r.status_code, "/".join(map(str, sorted(expect))), f"{ms:.0f}", "ok" if ok else "FAIL"))
        return r

    def raw_json(self, what: str, expect: set[int], body: str, who: str = "bob") -> Any:
        return self.send(what, expect, "POST", "/jobs", who, content=body, headers={"Content-Type": "application/json"})


def distill(teacher: str, decoder: str | None = None) -> dict[str, Any]:
    spec = copy.deepcopy(DISTILL_EXAMPLE)
    spec["teacher"]["checkpoint"] = teacher
    if decoder is not None:
        spec["distill"]["icd"]["decoder"] = decoder
    return spec


def with_value(path: tuple[Any, ...], literal: str) -> str:
    spec = copy.deepcopy(TRAIN_EXAMPLE)
    node: Any = spec
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "__V__"
    return json.dumps(spec).replace('"__V__"', literal)


def finished_job(env: dict[str, str], base: str, secret: str) -> tuple[int, Path]:
    """A succeeded train job of the token's owner with a final.pt, written through the store's own calls."""
    r = httpx.post(f"{base}/jobs", json=copy.deepcopy(TRAIN_EXAMPLE), headers={"Authorization": f"Bearer {secret}"})
    jid = r.json()["id"]
    return jid, succeed_with_checkpoint(env["ICD_DATABASE_URL"], Path(env["ICD_HOME"]) / "artifacts", jid)


def run_cases(p: Probe, env: dict[str, str], server_pid: int) -> list[str]:
    notes = []
    alice_job, alice_file = finished_job(env, p.base, p.tokens["alice"])
    _, bob_file = finished_job(env, p.base, p.tokens["bob"])
    # 1. owner bypass by path, in every checkpoint field
    train = copy.deepcopy(TRAIN_EXAMPLE)
    train["model"]["checkpoint"] = str(alice_file)
    p.send("another owner's final.pt as model.checkpoint", {422}, "POST", "/jobs", json=train)
    p.send("... as teacher.checkpoint", {422}, "POST", "/jobs", json=distill(str(alice_file)))
    student = distill(str(bob_file))
    student["student"]["checkpoint"] = f"jobs/{alice_job}/checkpoints/final.pt"
    p.send("... as student.checkpoint (relative to the store)", {422}, "POST", "/jobs", json=student)
    p.send("one's own final.pt by path", {201}, "POST", "/jobs", json=distill(str(bob_file)))
    p.send("an admin naming alice's file", {201}, "POST", "/jobs", json=distill(str(alice_file)), who="root")
    # 2. the decoder field
    for decoder in ("/etc/passwd", "../../../../../../etc/passwd", "%2e%2e/%2e%2e/etc/passwd", str(alice_file)):
        p.send(f"distill.icd.decoder = {decoder[-40:]}", {422}, "POST", "/jobs", json=distill(str(bob_file), decoder))
    p.send(
        f"distill.icd.decoder = job:{alice_job} (alice's)",
        {422},
        "POST",
        "/jobs",
        json=distill(str(bob_file), f"job:{alice_job}"),
    )
    # 3. YAML bombs and nesting
    for levels in (6, 7, 8, 9):
        text = alias_bomb(levels)
        before = rss_mb(server_pid)
        p.send(
            f"YAML alias bomb, {len(text)} bytes, 10^{levels} leaves",
            {422},
            "POST",
            "/jobs",
            content=text,
            headers={"Content-Type": "application/yaml"},
        )
        notes.append(f"bomb 10^{levels}: server RSS {before:.0f} -> {rss_mb(server_pid):.0f} MB")
    for depth in (1_000, 100_000):
        p.send(
            f"YAML nested {depth} deep",
            {422},
            "POST",
            "/jobs",
            content="[" * depth + "]" * depth,
            headers={"Content-Type": "application/yaml"},
        )
        p.raw_json(f"JSON nested {depth} deep", {400, 422}, "[" * depth + "]" * depth)
    # 4. non-finite floats, surrogates
    for path in (
        ("schedule", "lr"),
        ("schedule", "weight_decay"),
        ("schedule", "grad_clip"),
        ("model", "anchor_sizes", 0),
    ):
        for literal in ("Infinity", "NaN"):
            p.raw_json(f"{'.'.join(map(str, path))} = {literal}", {422}, with_value(path, literal))
    p.raw_json(
        "lone surrogate in data.train.images",
        {422},
        json.dumps(
            {
                **TRAIN_EXAMPLE,
                "data": {
                    **TRAIN_EXAMPLE["data"],
                    "train": {"format": "coco", "images": "\ud800", "annotations": "a.json"},
                },
            }
        ),
    )
    p.raw_json("lone surrogate in name", {422}, with_value(("name",), '"\\ud800"'))
    # 5. accepted before, failing later
    for path, literal in [
        (("data", "max_size"), "0"),
        (("model", "anchor_sizes"), "[0, 32, 64]"),
        (("model", "anchor_sizes"), "[-16, 32, 64]"),
        (("data", "train", "max_object"), "4000"),
        (("schedule", "checkpoint_every"), str(2**63)),
        (("schedule", "warmup_iters"), str(2**63)),
        (("device",), '"cuda:-1"'),
        (("device",), '"cuda:abc"'),
    ]:
        p.raw_json(f"{'.'.join(map(str, path))} = {literal}", {422}, with_value(path, literal))
    # 6. leaks and names
    r = p.send(
        "data.train.format: pickle",
        {422},
        "POST",
        "/jobs",
        json={**TRAIN_EXAMPLE, "data": {**TRAIN_EXAMPLE["data"], "train": {"format": "pickle"}}},
    )
    notes.append(f"format: pickle is blamed on {[e['field'] for e in r.json()['detail']]}")
    p.send("GET /jobs?kind=bogus", {422}, "GET", "/jobs?kind=bogus")
    health = p.send("anonymous GET /health", {200}, "GET", "/health", who=None)
    notes.append(f"anonymous /health warnings: {health.json().get('warnings')}")
    return notes


def submits_across_a_postgres_restart(p: Probe, count: int = 24) -> str:
    """POST /jobs in a loop while PostgreSQL itself restarts (pg_ctlcluster): every answer must be 201 or
    503 with Retry-After, and each 201 a job that exists afterwards."""
    version = sorted(os.listdir("/etc/postgresql"))[0]
    restart = subprocess.Popen(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    seen: dict[str, int] = {}
    created = []
    for _ in range(count):
        r = p.send("POST /jobs while PostgreSQL restarts", {201, 503}, "POST", "/jobs", json=TRAIN_EXAMPLE)
        key = f"{r.status_code}" + (" Retry-After" if r.headers.get("retry-after") else "")
        seen[key] = seen.get(key, 0) + 1
        if r.status_code == 201:
            created.append(r.json()["id"])
        time.sleep(0.25)
    restart.wait(timeout=120)
    missing = [j for j in created if p.send(f"GET /jobs/{j} after", {200}, "GET", f"/jobs/{j}").status_code != 200]
    return f"{count} submits across a PostgreSQL restart: {seen}; created jobs missing afterwards: {missing}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--restart-postgres",
        action="store_true",
        help="also submit while the machine's PostgreSQL restarts (disturbs everything else using it)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="icd-probe-") as tmp, pg_database() as db_url:
        env = {
            **os.environ,
            "ICD_HOME": f"{tmp}/home",
            "ICD_DATA_ROOTS": f"{tmp}/data",
            "ICD_DATABASE_URL": db_url,
            "ICD_BROKER_URL": f"sqla+sqlite:///{tmp}/broker.db",
            "ICD_REQUIRE_TOKEN": "1",
            "ICD_REAPER_INTERVAL_S": "0",
        }
        env.pop("ICD_API_TOKEN", None)
        Path(f"{tmp}/data").mkdir()
        subprocess.run([str(BIN / "icd"), "db", "upgrade"], env=env, check=True, capture_output=True)
        tokens = {}
        for name in ("alice", "bob", "root"):
            cmd = [str(BIN / "icd"), "token", "create", "--name", name, *(["--admin"] if name == "root" else [])]
            tokens[name] = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.split()[0]
        with serving(env, Path(tmp) / "serve.log") as (base, server):
            probe = Probe(base, tokens)
            notes = run_cases(probe, env, server.pid)
            if args.restart_postgres:
                notes.append(submits_across_a_postgres_restart(probe))
    lines = ["| case | status | must be | ms | |", "|---|---|---|---|---|"]
    lines += [f"| {what} | {code} | {expect} | {ms} | {ok} |" for what, code, expect, ms, ok in probe.rows]
    text = "\n".join(
        lines + [""] + [f"- {n}" for n in notes] + [f"\n{len(probe.rows)} cases, {probe.bad} answered otherwise"]
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"`.venv/bin/python benchmarks/attack_probe.py --out {args.out}`\n\n{text}\n")
    raise SystemExit(1 if probe.bad else 0)


if __name__ == "__main__":
    main()
