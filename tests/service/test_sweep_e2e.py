"""A sweep through the service with real parts: `icd worker` processes on Redis, PostgreSQL, the API.

Two of the four trials are pruned by construction: every trial fine-tunes a checkpoint whose
classifier bias was spread so that it already scores AP > 0 (AP 0 everywhere would prune nothing),
the two enqueued first train at a tiny lr (AP stays where it was), the last two at a large one (AP 0 at
the first evaluation, then divergence two steps later). With the median pruner waiting for 2 finished
trials and one trial at a time, trials 2 and 3 are pruned at step 2, before they diverge.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import IN_CI, flushed_redis_url, hot_checkpoint, tiny_train_spec, wait_for

from .fault_harness import Stack, pg_database, stack

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(600)]
GOOD, BAD = [1.0e-5, 2.0e-5], [0.5, 1.0]


@pytest.fixture
def stk(tmp_path: Path) -> Iterator[Stack]:
    try:
        with pg_database() as url, stack(tmp_path, url, flushed_redis_url()) as st:
            yield st
    except ConnectionError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def sweep_spec(checkpoint: Path, iterations: int) -> dict[str, Any]:
    base = tiny_train_spec("base", iterations=iterations, every=2)
    base["model"]["checkpoint"] = str(checkpoint)
    return {
        "kind": "sweep",
        "name": "lr-sweep",
        "base": base,
        "space": {"schedule.lr": {"log_uniform": [1.0e-5, 1.0]}},
        "sampler": {"kind": "random", "seed": 0},
        "pruner": {"kind": "median", "startup_trials": 2},
        "trials": 4,
        "parallel": 1,
        "enqueue": [{"schedule.lr": lr} for lr in GOOD + BAD],
    }


def _end(st: Stack, job_id: int, timeout: float = 480) -> dict[str, Any]:
    return wait_for(
        lambda: (j := st.job(job_id))["status"] in ("succeeded", "failed", "canceled") and j,
        timeout,
        f"sweep {job_id} to end",
    )


def _dump(st: Stack, sweep_id: int) -> str:
    logs = "\n".join(f"--- {n}\n{st.log(n)[-3000:]}" for n in st.workers)
    return f"{st.job(sweep_id)}\n{st.client.get(f'/jobs/{sweep_id}/trials').json()}\n{logs}"


def check_outcome(st: Stack, sweep_id: int, iterations: int) -> list[dict[str, Any]]:
    """Succeeded; trials 0-1 trained to the end, 2-3 pruned at step 2 with the reason; the best is 0 or 1."""
    sweep = _end(st, sweep_id)
    assert sweep["status"] == "succeeded", _dump(st, sweep_id)
    view = st.client.get(f"/jobs/{sweep_id}/trials").json()
    trials = view["trials"]
    assert [t["number"] for t in trials] == [0, 1, 2, 3], view  # nothing ran twice, nothing is missing
    assert [t["params"]["schedule.lr"] for t in trials] == GOOD + BAD
    assert [t["status"] for t in trials] == ["succeeded", "succeeded", "pruned", "pruned"], _dump(st, sweep_id)
    for t in trials[2:]:
        assert t["reason"].startswith("AP 0.0 at step 2, below the median"), t
        job = st.job(t["job_id"])
        assert job["status"] == "pruned" and job["progress_step"] == 2 < iterations  # stopped early
        assert job["status_detail"].startswith("pruned by its sweep: AP 0.0 at step 2")
        assert job["final_metrics"]["pruned_at_step"] == 2
    assert all(st.job(t["job_id"])["progress_step"] == iterations for t in trials[:2])
    final = sweep["final_metrics"]
    assert final["best_trial"] == view["best"] in (0, 1) and final["best_AP"] > 0
    assert final["best_params"] == trials[view["best"]]["params"]
    assert final["trials_pruned"] == 2 and final["trials_succeeded"] == 2
    report = st.client.get(f"/jobs/{sweep_id}/report").json()
    assert report["best"]["number"] == view["best"] and report["counts"] == {"succeeded": 2, "pruned": 2}
    assert "| 2 | pruned |" in st.client.get(f"/jobs/{sweep_id}/report.md").text
    return trials


def test_a_sweep_prunes_two_trials_and_reports_the_best(stk: Stack, tmp_path: Path) -> None:
    hot = hot_checkpoint(tmp_path / "home" / "cache")  # inside the allowed roots
    stk.start_worker("a")
    stk.wait_workers_alive("a")
    sweep_id = stk.submit(sweep_spec(hot, iterations=4))
    check_outcome(stk, sweep_id, 4)
    listed = stk.client.get("/jobs", params={"parent_id": sweep_id}).json()["items"]
    assert sorted(j["status"] for j in listed) == ["pruned", "pruned", "succeeded", "succeeded"]


def test_a_worker_killed_mid_sweep_loses_nothing(stk: Stack, tmp_path: Path) -> None:
    hot = hot_checkpoint(tmp_path / "home" / "cache")
    stk.start_worker("a")
    stk.start_worker("b")
    stk.wait_workers_alive("a", "b")
    sweep_id = stk.submit(sweep_spec(hot, iterations=10))

    def trial_one() -> dict[str, Any] | None:
        trials = stk.client.get(f"/jobs/{sweep_id}/trials").json()["trials"]
        job = stk.job(trials[1]["job_id"]) if len(trials) > 1 else None
        return job if job and job["status"] == "running" and job["progress_step"] >= 5 else None

    running = wait_for(trial_one, 300, "trial 1 to pass step 5")
    stk.kill_worker(running["worker"].split("@")[0])
    trials = check_outcome(stk, sweep_id, 10)
    first, resumed = stk.job(trials[0]["job_id"]), stk.job(trials[1]["job_id"])
    assert first["attempt"] == 1  # the trial that had ended was not run again
    assert resumed["attempt"] == 2 and resumed["attempts"][0]["status"] == "lost"
    assert resumed["attempts"][-1]["resumed_from_step"] >= 2  # from its checkpoint, not from scratch
    assert stk.loss_steps(resumed["id"]) == list(range(1, 11))


def test_a_tuned_study_runs_its_sweep_then_its_seeds_at_the_best_setting(stk: Stack, tmp_path: Path) -> None:
    """A study with `tune:` through real workers: a sweep child per method, its trials under it, then the
    seeds at the sweep's best weight; the report carries the setting, the tuning table and the verdict."""
    hot = hot_checkpoint(tmp_path / "home" / "cache")
    train = tiny_train_spec("t", iterations=2)
    study = {
        "kind": "study",
        "name": "tuned",
        "device": "cpu",
        "data": train["data"],
        "teacher": {**train["model"], "checkpoint": str(hot)},
        "student": train["model"],
        "methods": ["fitnet"],
        "seeds": [0, 1],
        "distill": {"inherit": True},
        "schedule": {"iterations": 2, "batch_size": 2},
        "teacher_min_ap": 0.0,
        "require_teacher_better": False,
        "tune": {"trials": 2, "pruner": {"kind": "none"}, "split": 0.5,
                 "space": {"fitnet": {"distill.weight": {"choice": [0.5, 2.0]}}}},
    }  # fmt: skip
    stk.start_worker("a")
    stk.wait_workers_alive("a")
    study_id = stk.submit(study)
    done = wait_for(
        lambda: (j := stk.job(study_id))["status"] in ("succeeded", "failed", "canceled") and j, 480, "the study"
    )
    children = stk.client.get("/jobs", params={"parent_id": study_id}).json()["items"]
    assert done["status"] == "succeeded", (done, children)
    sweeps = [c for c in children if c["kind"] == "sweep"]
    seeds = [c for c in children if c["kind"] == "distill"]
    assert len(sweeps) == 1 and sweeps[0]["status"] == "succeeded" and len(seeds) == 4
    assert min(c["id"] for c in seeds) > sweeps[0]["id"]  # the seeds were created after the sweep ended
    best = stk.job(sweeps[0]["id"])["final_metrics"]["best_params"]
    trials = stk.client.get("/jobs", params={"parent_id": sweeps[0]["id"]}).json()["items"]
    assert len(trials) == 2 and all(t["status"] == "succeeded" for t in trials)
    for c in seeds:
        spec = stk.job(c["id"])["spec"]
        assert spec["distill"]["weight"] == (best["distill.weight"] if spec["distill"]["method"] == "fitnet" else None)
    report = stk.client.get(f"/jobs/{study_id}/report").json()
    row = next(m for m in report["methods"] if m["method"] == "fitnet")
    assert row["setting"] == best and row["n"] == 2 and row["paired_delta_AP"]["n"] == 2
    assert report["tuning"]["methods"]["fitnet"]["best_params"] == best
    assert report["verdict"]
