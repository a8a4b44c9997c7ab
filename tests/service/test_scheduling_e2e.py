"""The scheduler with real `icd worker` processes on Redis and PostgreSQL, the API in-process with its
reaper (docs/scheduling.md): the order jobs run in, owners taking turns, and preemption onto a checkpoint.

Each test asserts the order and the steps a user sees, never a duration.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from store.db import make_engine, session_factory
from store.tokens import create_token
from tests.helpers import IN_CI, flushed_redis_url

from .fault_harness import Stack, pg_database, stack, tiny_train_spec

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.timeout(400)]


@pytest.fixture
def database() -> Iterator[str]:
    try:
        with pg_database() as url:
            yield url
    except ConnectionError as exc:
        if IN_CI:
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture
def stk(tmp_path: Path, database: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setenv("ICD_PREEMPT_MIN_RUN_S", "0")  # the API's own settings read it too
    with stack(tmp_path, database, flushed_redis_url(), extra_env={"ICD_PREEMPT_MIN_RUN_S": "0"}) as st:
        st.start_worker("w1")
        st.wait_workers_alive("w1")
        yield st


def _spec(name: str, iterations: int = 2, priority: int = 0, device: str = "cpu", **extra: Any) -> dict[str, Any]:
    spec = tiny_train_spec(name, iterations, checkpoint_every=iterations)
    return {**spec, "device": device, "priority": priority, **extra}


def _started_order(st: Stack, ids: list[int]) -> list[int]:
    """The jobs by the start of their first attempt, once all have ended."""
    jobs = {i: st.wait_end(i) for i in ids}
    for i, j in jobs.items():
        assert j["status"] == "succeeded", (i, j["error"])
    return sorted(ids, key=lambda i: jobs[i]["attempts"][0]["started_at"])


def _tokens(st: Stack, *names: str) -> dict[str, str]:
    engine = make_engine(st.database_url)
    with session_factory(engine)() as s:
        out = {n: create_token(s, n)[1] for n in names}
    engine.dispose()
    return out


def test_one_worker_runs_high_then_lows_oldest_first_across_two_queues(stk: Stack) -> None:
    blocker = stk.submit(_spec("running", 12, priority=10))  # above the others: nothing preempts it
    stk.wait_step(blocker, 1)
    low1 = stk.submit(_spec("low1"))
    low2 = stk.submit(_spec("low2"))
    high = stk.submit(_spec("high", priority=5, device="auto"))  # queue `any`, the lows are on `cpu`
    low3 = stk.submit(_spec("low3"))
    assert [stk.job(i)["queue"] for i in (low1, high)] == ["cpu", "any"]
    assert _started_order(stk, [blocker, low1, low2, high, low3]) == [blocker, high, low1, low2, low3]


def test_two_owners_at_equal_priority_alternate(stk: Stack) -> None:
    secrets = _tokens(stk, "alice", "bob")
    blocker = stk.submit(_spec("running", 12, priority=10))
    stk.wait_step(blocker, 1)

    def submit(owner: str, name: str) -> int:
        r = stk.client.post("/jobs", json=_spec(name), headers={"Authorization": f"Bearer {secrets[owner]}"})
        assert r.status_code == 201, r.text
        return int(r.json()["id"])

    a = [submit("alice", f"a{i}") for i in range(3)]
    b = [submit("bob", f"b{i}") for i in range(3)]
    assert _started_order(stk, [blocker, *a, *b]) == [blocker, a[0], b[0], a[1], b[1], a[2], b[2]]


def test_preemption_checkpoints_requeues_and_resumes_exactly(stk: Stack) -> None:
    iterations = 40
    low = stk.submit(_spec("low", iterations, max_attempts=1))  # a counted preemption would fail it
    stk.wait_step(low, 3)
    high = stk.submit(_spec("high", 2, priority=5))
    done_high, done_low = stk.wait_end(high), stk.wait_end(low)
    assert done_high["status"] == "succeeded" and done_low["status"] == "succeeded", done_low["error"]

    first, second = done_low["attempts"]
    assert first["status"] == "preempted" and done_low["preemptions"] == 1 and done_low["attempt"] == 2
    stopped = int(re.search(r"preempted at step (\d+) by job (\d+)", first["error"]).group(1))  # type: ignore[union-attr]
    assert f"by job {high} (owner local admin, priority 5)" in first["error"]
    assert second["resumed_from_step"] == stopped  # the checkpoint of the step it stopped at
    assert first["finished_at"] <= done_high["attempts"][0]["started_at"]  # the high job took its worker
    assert stk.loss_steps(low) == list(range(1, iterations + 1))  # 0 steps lost or repeated

    # Within one step of the worker hearing of it: the last step logged before "preempted by job" is the
    # step it stopped at, or the one before it.
    log = stk.client.get(f"/jobs/{low}/logs").text
    heard = log.index(f"preempted by job {high}")
    seen = [int(m) for m in re.findall(r"step (\d+)/\d+", log[:heard])]
    assert stopped - 1 <= seen[-1] <= stopped
