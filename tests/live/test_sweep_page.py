"""The sweep page (issue 20, item 4) in headless Chromium: the trials with status, parameters and AP; AP
against each parameter with pruned trials marked; the best trial's curve beside the others'.

The sweep and its trials are written to the database by the functions the service uses (store.jobs,
store.sweeps, store.results; worker.sweep closes it), with chosen parameters and results so every
assertion knows where a point must be: two trials succeeded, two pruned with their reasons, one failed,
one running. The API is a real `icd serve --no-worker`; no trial trains (no worker, no broker traffic).
The test reads what the page drew: the table's cells, each chart's uPlot (where a point's value lands in
pixels) and the canvas's pixels around a point (a pruned point is a hollow purple ring, a finished one a
filled blue dot). Then the running trial ends as the new best, the sweep closes, and the open page
follows.

With ICD_SWEEP_PAGE_SHOTS=<folder> it also saves the page, live and finished, as PNGs there (the
README of benchmarks/results/sweep-page-2026-12-07/ describes them).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.webdriver.common.by import By

from tests.helpers import REPO, free_port, stop_process, tiny_train_spec, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LR, WARMUP, BATCH = "schedule.lr", "schedule.warmup_iters", "schedule.batch_size"
SPACE = {LR: {"log_uniform": [1.0e-4, 0.1]}, WARMUP: {"int": [0, 4]}, BATCH: {"choice": [2, 4]}}
PRUNED_2 = "AP 0.0 at step 2, below the median (7.0) of 2 finished trials at that step"
PRUNED_3 = "AP 5.5 at step 4, below the median (13.8) of 2 finished trials at that step"
FAILED_4 = "training diverged at step 3: the loss is not finite (lower schedule.lr)"


@dataclass
class Trial:
    number: int
    params: dict[str, Any]
    outcome: str  # succeeded, pruned, failed or running
    evals: dict[int, float]  # step -> AP
    value: float | None = None  # final AP (succeeded) or AP where it stopped (pruned)
    reason: str | None = None


TRIALS = [
    Trial(0, {LR: 0.003, WARMUP: 2, BATCH: 4}, "succeeded", {2: 10.0, 4: 20.0, 6: 28.0, 8: 31.5}, 31.5),
    Trial(1, {LR: 0.0002, WARMUP: 0, BATCH: 2}, "succeeded", {2: 4.0, 4: 7.5, 6: 10.0, 8: 12.25}, 12.25),
    Trial(2, {LR: 0.08, WARMUP: 4, BATCH: 4}, "pruned", {2: 0.0}, 0.0, PRUNED_2),
    Trial(3, {LR: 0.0006, WARMUP: 1, BATCH: 2}, "pruned", {2: 3.0, 4: 5.5}, 5.5, PRUNED_3),
    Trial(4, {LR: 0.05, WARMUP: 3, BATCH: 2}, "failed", {2: 1.0}, None, FAILED_4),
    Trial(5, {LR: 0.0015, WARMUP: 2, BATCH: 4}, "running", {2: 12.0, 4: 22.0}),
]
# Trial 5 later ends with these evaluations and AP: the new best.
LATER_5 = {6: 33.0, 8: 40.0}

BLUE, PURPLE, GOLD = (0x09, 0x69, 0xDA), (0x82, 0x50, 0xDF), (0xBF, 0x87, 0x00)


@dataclass
class Api:
    url: str
    http: httpx.Client
    tmp: Path


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """`icd serve --no-worker` on a fresh SQLite database; this process writes to the same database and
    artifact folder (its ICD_ settings point there while the module runs)."""
    from store.db import upgrade_database
    from store.settings import get_settings

    tmp = tmp_path_factory.mktemp("sweep-page")
    db_url = f"sqlite:///{tmp / 'icd.db'}"
    upgrade_database(db_url)
    ours = {"ICD_HOME": str(tmp / "home"), "ICD_DATABASE_URL": db_url}
    env = {k: v for k, v in os.environ.items() if not k.startswith("ICD_")} | ours | {"PYTHONPATH": str(REPO)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp / "api.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "icd_cli", "serve", "--no-worker", "--port", str(port), "--log-level", "warning"],
            cwd=tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    http = httpx.Client(base_url=url, timeout=30)
    mp = pytest.MonkeyPatch()
    for k, v in ours.items():
        mp.setenv(k, v)
    get_settings.cache_clear()
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the API exited:\n{(tmp / 'api.log').read_text()[-3000:]}")
            try:
                return http.get("/jobs").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, 60, "the API")
        yield Api(url, http, tmp)
    finally:
        http.close()
        stop_process(proc, signal.SIGINT)
        mp.undo()
        get_settings.cache_clear()


def make_sweep(db_url: str) -> tuple[int, dict[int, int]]:
    """The sweep (waiting for its running trial) and its six trials: (sweep id, {trial number: job id})."""
    from icd_core.spec import SweepSpec, parse_spec
    from icd_core.sweep import trial_spec
    from store import jobs as q
    from store.db import make_engine, session_factory
    from store.results import add_evaluation
    from store.sweeps import create_trial

    spec = {
        "kind": "sweep",
        "name": "page-sweep",
        "base": tiny_train_spec(iterations=8, every=2),
        "space": SPACE,
        "sampler": {"kind": "tpe", "seed": 0, "startup_trials": 4},
        "pruner": {"kind": "median", "startup_trials": 2},
        "trials": len(TRIALS),
        "parallel": 2,
    }
    sweep = parse_spec(spec)  # the checks a submit makes
    assert isinstance(sweep, SweepSpec)
    engine = make_engine(db_url)
    s = session_factory(engine)()
    try:
        job = q.create_job(s, sweep.model_dump(mode="json"), "sweep", "page-sweep", "cpu")
        q.claim_job(s, job.id, "w0")
        q.park_study(s, job.id, len(TRIALS))
        ids = {}
        for t in TRIALS:
            child = create_trial(
                s, job, t.number, t.params, trial_spec(sweep, t.number, t.params).model_dump(mode="json"), "cpu"
            )
            ids[t.number] = child.id
            q.claim_job(s, child.id, f"w{t.number}")
            for step, ap in t.evals.items():
                add_evaluation(s, child.id, 1, step, {"AP": ap, "AP50": min(100.0, 2 * ap)}, {})
            last = max(t.evals)
            if t.outcome == "succeeded":
                q.update_progress(s, child.id, last, 8, None)
                q.finish_job(s, child.id, {"AP": t.value, "step": last})
            elif t.outcome == "pruned":
                q.update_progress(s, child.id, last, 8, None)
                q.mark_pruned(s, child.id, t.reason, {"AP": t.value, "pruned_at_step": float(last)}, last)
            elif t.outcome == "failed":
                q.update_progress(s, child.id, 3, 8, None)
                q.fail_job(s, child.id, t.reason)
            else:
                q.update_progress(s, child.id, 5, 8, 12.0)
        q.update_progress(s, job.id, len(TRIALS) - 1, len(TRIALS), None)
        return job.id, ids
    finally:
        s.close()
        engine.dispose()


def end_trial_5(db_url: str, job_id: int) -> None:
    """Trial 5 finishes with AP 40 and its sweep closes (worker.sweep.child_ended, as a worker would)."""
    from store import jobs as q
    from store.db import make_engine, session_factory
    from store.results import add_evaluation
    from worker.sweep import child_ended

    engine = make_engine(db_url)
    s = session_factory(engine)()
    try:
        for step, ap in LATER_5.items():
            add_evaluation(s, job_id, 1, step, {"AP": ap}, {})
        q.update_progress(s, job_id, 8, 8, None)
        q.finish_job(s, job_id, {"AP": LATER_5[8], "step": 8})
        assert child_ended(s, job_id) == []  # the budget is used: the sweep closes
    finally:
        s.close()
        engine.dispose()


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


# Each point of a parameter chart as drawn: its trial, the series it is in, and its position in CSS pixels
# (uPlot's valToPos: where the canvas puts that value), plus the canvas pixels in a 23 x 23 square around
# its centre (device pixels).
POINTS_JS = """
const c = window.icd.sweep.charts[arguments[0]];
const u = c.u;
const dpr = window.devicePixelRatio || 1;
return {
  title: u.root.querySelector('.u-title')?.textContent,
  xLabel: u.axes[0].label,
  legend: [...u.root.querySelectorAll('.u-legend .u-series')].map(e => e.textContent.trim()),
  series: u.series.slice(1).map(s => s.label),
  points: c.points.map((p, i) => {
    const inSeries = u.series.slice(1).map((s, k) => u.data[k + 1][i] != null ? s.label : null).filter(Boolean);
    const cx = Math.round(u.valToPos(p.x, 'x', true)), cy = Math.round(u.valToPos(p.value, 'y', true));
    const r = Math.round(11 * dpr);
    const img = u.ctx.getImageData(cx - r, cy - r, 2 * r + 1, 2 * r + 1);
    const px = [];
    for (let j = 0; j < img.data.length; j += 4) px.push([...img.data.slice(j, j + 4)]);
    const centre = px[Math.floor(px.length / 2)];
    return { ...p, inSeries, left: u.valToPos(p.x, 'x'), top: u.valToPos(p.value, 'y'), centre, px };
  }),
};
"""

CURVES_JS = """
const c = window.icd.sweep.curves;
const u = c.u;
return {
  title: u.root.querySelector('.u-title')?.textContent,
  steps: u.data[0],
  lines: c.lines.map((l, i) => ({ trial: l.trial, status: l.status, best: l.best, color: l.color, dash: l.dash,
    label: u.series[i + 1].label, width: u.series[i + 1].width, values: u.data[i + 1] })),
};
"""


def near(rgba: list[int], rgb: tuple[int, int, int], tol: int = 40) -> bool:
    return rgba[3] > 200 and all(abs(a - b) <= tol for a, b in zip(rgba[:3], rgb, strict=False))


def count_near(px: list[list[int]], rgb: tuple[int, int, int]) -> int:
    return sum(near(p, rgb) for p in px)


# The trial table as the user reads it, in one script: the page re-renders the table at every poll, so
# elements found one by one could be replaced between two reads.
TABLE_JS = """
return [...document.querySelectorAll('#sw-trials tbody tr')].map(tr => ({
  trial: Number(tr.dataset.trial),
  status: tr.querySelector('[data-status]').textContent,
  AP: tr.querySelector('[data-value]').textContent,
  note: tr.querySelector('td.note').textContent,
  first: tr.querySelector('td').textContent.trim(),
  class: tr.className,
  ...Object.fromEntries([...tr.querySelectorAll('td[data-param]')].map(td => [td.dataset.param, td.textContent])),
}));
"""


def table(browser: Any) -> dict[int, dict[str, str]]:
    return {row["trial"]: row for row in js(browser, TABLE_JS)}


def check_param_chart(browser: Any, name: str, trials: list[Trial], best: int) -> dict[str, Any]:
    """The chart of `name`: one point per trial with an AP, at the place its value says, in its series."""
    got = js(browser, POINTS_JS, name)
    assert got["title"] == f"AP vs {name}"
    assert got["series"] == ["finished", "pruned (where it stopped)", "best"]
    assert any(s.startswith("pruned") for s in got["legend"]), got["legend"]
    placed = [t for t in trials if t.value is not None]
    pts = {p["trial"]: p for p in got["points"]}
    assert set(pts) == {t.number for t in placed}  # the failed and the running trial have no AP to place
    for t in placed:
        p = pts[t.number]
        assert p["value"] == t.value
        expected = {"succeeded": ["finished"], "pruned": ["pruned (where it stopped)"]}[t.outcome]
        assert p["inSeries"] == expected + (["best"] if t.number == best else []), (t.number, p["inSeries"])
        # What the canvas shows there: a filled blue dot; a pruned one a hollow ring (white centre, purple
        # ring); the best one also a gold ring.
        if t.outcome == "succeeded":
            assert near(p["centre"], BLUE), (t.number, p["centre"])
            assert count_near(p["px"], PURPLE) == 0
        else:
            assert near(p["centre"], (255, 255, 255), 30), (t.number, p["centre"])
            assert count_near(p["px"], PURPLE) >= 8 and count_near(p["px"], BLUE) == 0, t.number
        if t.number == best:
            assert count_near(p["px"], GOLD) >= 8, "the best point is ringed"
    # Higher AP, higher on the chart.
    by_ap = sorted(placed, key=lambda t: t.value)
    tops = [pts[t.number]["top"] for t in by_ap]
    assert all(a > b for a, b in zip(tops, tops[1:], strict=False)), tops
    return {"points": pts, "xLabel": got["xLabel"]}


def check_x(points: dict[int, dict[str, Any]], trials: list[Trial], name: str, scale: str) -> None:
    """Left to right by the parameter's value; spaced on a log scale for log_uniform, linearly for int."""
    placed = sorted((t for t in trials if t.value is not None), key=lambda t: (t.params[name], t.number))
    lefts = [points[t.number]["left"] for t in placed]
    values = [t.params[name] for t in placed]
    for (v1, l1), (v2, l2) in zip(
        zip(values, lefts, strict=True), zip(values[1:], lefts[1:], strict=True), strict=False
    ):
        assert (l2 > l1 + 5) if v2 > v1 else abs(l2 - l1) < 0.5, (name, values, lefts)
    f = {"log": math.log, "linear": float}[scale]
    lo, hi = placed[0], placed[-1]
    for t in placed[1:-1]:
        want = (f(t.params[name]) - f(lo.params[name])) / (f(hi.params[name]) - f(lo.params[name]))
        got = (points[t.number]["left"] - points[lo.number]["left"]) / (
            points[hi.number]["left"] - points[lo.number]["left"]
        )
        assert abs(got - want) < 0.02, (name, t.number, got, want)


def check_page(browser: Any, trials: list[Trial], job_ids: dict[int, int], best: int, finished: bool) -> None:
    rows = table(browser)
    assert sorted(rows) == [t.number for t in trials]
    for t in trials:
        row = rows[t.number]
        assert row["status"] == t.outcome
        assert (
            row[LR] == f"{t.params[LR]:g}"
            and row[WARMUP] == str(t.params[WARMUP])
            and row[BATCH] == str(t.params[BATCH])
        )
        assert row["AP"] == ("" if t.value is None else f"{t.value:.2f}"), (t.number, row)
        assert row["note"] == (t.reason or ""), (t.number, row)
        assert ("best" in row["class"].split()) == (t.number == best) and row["first"].endswith("★") == (
            t.number == best
        )
    b = next(t for t in trials if t.number == best)
    verdict = browser.find_element(By.ID, "sw-best").text
    assert verdict == (
        f"{'Best' if finished else 'Best so far'}: trial {best} (job {job_ids[best]}), schedule.lr={b.params[LR]:g}, "
        f"schedule.warmup_iters={b.params[WARMUP]}, schedule.batch_size={b.params[BATCH]}: AP {b.value:.2f}."
    )

    charts = browser.find_elements(By.CSS_SELECTOR, "#sw-charts .chart[data-param]")
    assert [c.get_attribute("data-param") for c in charts] == [LR, WARMUP, BATCH]  # one chart per parameter
    lr = check_param_chart(browser, LR, trials, best)
    assert lr["xLabel"] == f"{LR} (log scale)"
    check_x(lr["points"], trials, LR, "log")
    warm = check_param_chart(browser, WARMUP, trials, best)
    check_x(warm["points"], trials, WARMUP, "linear")
    batch = check_param_chart(browser, BATCH, trials, best)
    lefts = {t.params[BATCH]: batch["points"][t.number]["left"] for t in trials if t.value is not None}
    assert lefts[2] + 50 < lefts[4]  # the choices, in the spec's order

    curves = js(browser, CURVES_JS)
    assert curves["title"] == "AP over evaluations: the best trial and the others"
    lines = {line["trial"]: line for line in curves["lines"]}
    assert set(lines) == {t.number for t in trials}  # every trial that evaluated, the failed one too
    assert curves["lines"][-1]["trial"] == best  # drawn last, over the others
    for t in trials:
        line = lines[t.number]
        drawn = {s: v for s, v in zip(curves["steps"], line["values"], strict=True) if v is not None}
        assert drawn == t.evals, (t.number, drawn)  # a pruned trial's line ends where it stopped
        if t.number == best:
            assert line["label"] == f"trial {best} ★ best" and line["width"] >= 3 and line["color"] == "#bf8700"
        else:
            assert line["label"] == f"trial {t.number} ({t.outcome})" and line["width"] < 2
            assert (line["dash"] is not None) == (t.outcome in ("pruned", "running"))
            assert line["color"] == {"pruned": "#8250df", "failed": "#cf222e"}.get(t.outcome, "#8c959f")

    compare = browser.find_element(By.CSS_SELECTOR, "#sw-compare a").get_attribute("href")
    ended = [t.number for t in trials if t.outcome in ("succeeded", "pruned") and t.number != best]
    assert compare.endswith(f"#/compare?ids={','.join(str(job_ids[n]) for n in [best, *ended])}&series=loss")


def shot(browser: Any, name: str) -> None:
    folder = os.environ.get("ICD_SWEEP_PAGE_SHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    height = js(browser, "return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 140)
    time.sleep(1)  # the charts' resize
    browser.save_screenshot(str(Path(folder) / f"{name}.png"))
    browser.set_window_size(1400, 1600)


def test_sweep_page_draws_trials_parameter_charts_and_the_best_curve(api: Api, browser: Any) -> None:
    db_url = f"sqlite:///{api.tmp / 'icd.db'}"
    sweep_id, job_ids = make_sweep(db_url)
    view = api.http.get(f"/jobs/{sweep_id}/trials").json()
    assert view["best"] == 0 and [t["status"] for t in view["trials"]] == [t.outcome for t in TRIALS]

    browser.get(f"{api.url}/#/jobs/{sweep_id}")
    wait_for(lambda: js(browser, "return window.icd.sweep?.charts?.['schedule.lr']?.u != null"), 60, "the sweep page")
    time.sleep(0.5)  # uPlot draws on the next frame
    assert browser.find_element(By.ID, "sw-state").text == f"({len(TRIALS)}/{len(TRIALS)})"
    check_page(browser, TRIALS, job_ids, best=0, finished=False)
    assert not browser.find_elements(By.CSS_SELECTOR, "#sw-report a")  # no report before the sweep ends
    shot(browser, "sweep-live")

    # Trial 5 ends as the new best; the sweep closes; the open page follows without a reload.
    end_trial_5(db_url, job_ids[5])
    wait_for(lambda: js(browser, "return window.icd.sweep?.status") == "succeeded", 30, "the page to see the sweep end")
    time.sleep(0.5)
    done = [*TRIALS[:5], Trial(5, TRIALS[5].params, "succeeded", {**TRIALS[5].evals, **LATER_5}, LATER_5[8])]
    check_page(browser, done, job_ids, best=5, finished=True)
    assert browser.find_element(By.ID, "sw-state").text == f"({len(TRIALS)}/{len(TRIALS)}, succeeded)"
    links = {a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "#sw-report a")}
    assert set(links) == {"JSON", "markdown"}
    report = api.http.get(f"/jobs/{sweep_id}/report").json()
    assert report["best"]["number"] == 5 and report["counts"] == {"succeeded": 3, "pruned": 2, "failed": 1}
    shot(browser, "sweep-finished")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
