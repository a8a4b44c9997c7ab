"""The docs UI and the dashboard in headless Chromium against a live server with a real worker.

Charts are checked through their data (window.icd.charts[...] holds each uPlot chart's points), not only
through the DOM. Outside hosts are unresolvable in this browser, so a page that needed a CDN would fail.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.helpers import tiny_study_spec, tiny_train_spec
from tests.live.conftest import LiveService, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(900)]


OP = "#operations-jobs-submit_job_jobs_post"  # Swagger UI's element of POST /jobs


def js(driver: Any, script: str) -> Any:
    return driver.execute_script(script)


def assert_local_only(driver: Any, base: str) -> None:
    """Every resource the page loaded came from the service itself (no CDN, nothing outside)."""
    urls = js(driver, "return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [u for u in urls if not u.startswith(base) and not u.startswith("data:")]
    assert not outside, outside


def until(driver: Any, timeout: float, what: str, cond: Any) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.3).until(cond, message=f"waiting for {what}")


def test_docs_list_operations_and_try_it_out_creates_a_job(live_service: LiveService, browser: Any) -> None:
    browser.get(f"{live_service.url}/docs")
    until(browser, 30, "Swagger UI to render", ec.presence_of_element_located((By.CSS_SELECTOR, ".opblock")))
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/jobs", "/jobs/{job_id}", "/jobs/{job_id}/metrics", "/jobs/{job_id}/logs", "/health"} <= paths
    assert not browser.find_elements(By.CSS_SELECTOR, ".errors-wrapper"), "Swagger UI reported errors"
    assert_local_only(browser, live_service.url)

    block = browser.find_element(By.CSS_SELECTOR, OP)
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    until(browser, 10, "Try it out", ec.element_to_be_clickable((By.CSS_SELECTOR, f"{OP} .try-out__btn"))).click()
    body = until(
        browser,
        10,
        "the body editor",
        ec.presence_of_element_located((By.CSS_SELECTOR, f"{OP} textarea.body-param__text")),
    )
    example = json.loads(body.get_attribute("value"))
    assert example["kind"] == "train"  # the train example comes first: it runs on a fresh server
    browser.find_element(By.CSS_SELECTOR, f"{OP} .execute").click()
    code = until(
        browser,
        30,
        "the live response",
        ec.presence_of_element_located(
            (By.CSS_SELECTOR, f"{OP} .live-responses-table tr.response .response-col_status")
        ),
    )
    assert code.text.strip().startswith("201")
    text = browser.find_element(By.CSS_SELECTOR, f"{OP} .live-responses-table .microlight").text
    job = json.loads(text)
    assert live_service.job(job["id"])["name"] == example["name"]
    live_service.http.post(f"/jobs/{job['id']}/cancel")  # a 300-step job: leave the worker to the next tests
    live_service.wait_status(job["id"], {"canceled"}, timeout=240)

    browser.get(f"{live_service.url}/redoc")
    until(browser, 30, "ReDoc to render", ec.presence_of_element_located((By.CSS_SELECTOR, "[data-section-id]")))
    assert "Submit Job" in browser.page_source
    time.sleep(1)  # ReDoc renders its footer (with a logo image) after the first paint
    assert_local_only(browser, live_service.url)


def test_dashboard_lists_a_running_job_charts_it_live_and_cancels_it(live_service: LiveService, browser: Any) -> None:
    job = live_service.submit(tiny_train_spec("browser-long", 2000, every=1000, lr=0.001))
    browser.get(f"{live_service.url}/")
    row = until(
        browser,
        30,
        "the job in the list",
        ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-job="{job["id"]}"]')),
    )
    assert "browser-long" in row.text
    # Search, filters and paging live in the URL (a reload keeps them) and are applied by the API.
    browser.get(f"{live_service.url}/#/?search=BROWSER-lo")
    until(
        browser,
        20,
        "the search result",
        lambda d: (
            [r.get_attribute("data-job") for r in d.find_elements(By.CSS_SELECTOR, "tr[data-job]")] == [str(job["id"])]
        ),
    )
    browser.get(f"{live_service.url}/#/?status=succeeded&kind=train")
    until(browser, 20, "the filtered list", lambda d: "jobs" in d.find_element(By.ID, "page-info").text)
    assert not browser.find_elements(By.CSS_SELECTOR, f'tr[data-job="{job["id"]}"]')
    assert browser.find_element(By.CSS_SELECTOR, "#filters select[name=status]").get_attribute("value") == "succeeded"
    browser.get(f"{live_service.url}/#/?search=browser-long")
    row = until(
        browser,
        20,
        "the job in the list",
        ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-job="{job["id"]}"]')),
    )

    row.find_element(By.LINK_TEXT, str(job["id"])).click()
    assert browser.current_url.endswith(f"#/jobs/{job['id']}")
    first = until(browser, 240, "progress", lambda d: (p := js(d, "return window.icd.jobPage")) and p["step"] > 0 and p)
    points = until(
        browser,
        60,
        "loss points",
        lambda d: js(d, "const c = window.icd.charts.losses; return c && c.u && c.pointCount().loss"),
    )
    later = until(
        browser,
        120,
        "progress to move",
        lambda d: (p := js(d, "return window.icd.jobPage"))["step"] > first["step"] and p,
    )
    time.sleep(2.5)  # one more poll: the chart grows from incremental since_step fetches
    more = js(browser, "return window.icd.charts.losses.pointCount().loss")
    assert more > points, (points, more)
    u = js(
        browser,
        """const u = window.icd.charts.losses.u;
        return {x: u.data[0].length, y: u.data[1].filter(v => v != null).length,
                labels: u.series.map(s => s.label), axes: u.axes.map(a => a.label)}""",
    )
    assert u["x"] >= more and u["y"] > 0 and "loss" in u["labels"] and u["axes"] == ["step", "loss"]
    assert browser.find_element(By.CSS_SELECTOR, '[data-chart="losses"] .u-legend').is_displayed()
    assert "browser-long" in browser.find_element(By.ID, "spec").text
    wait_for(lambda: "step " in browser.find_element(By.ID, "log").text, 30, "the log tail")
    assert later["status"] == "running"
    assert_local_only(browser, live_service.url)

    browser.find_element(By.ID, "cancel").click()
    until(
        browser,
        120,
        "the canceled badge",
        ec.presence_of_element_located((By.CSS_SELECTOR, '#job-head [data-status="canceled"]')),
    )
    assert live_service.job(job["id"])["status"] == "canceled"
    until(browser, 10, "polling to stop", lambda d: js(d, "return window.icd.jobPage.stopped") is True)
    assert not browser.find_element(By.ID, "retry").get_attribute("disabled")


def test_submit_form_shows_the_apis_422_on_the_field(live_service: LiveService, browser: Any) -> None:
    import yaml

    spec = tiny_train_spec("browser-bad", 4)
    spec["schedule"]["lr"] = -1
    browser.get(f"{live_service.url}/#/submit")
    editor = until(
        browser, 20, "the editor to fill", lambda d: (e := d.find_element(By.ID, "editor")).get_attribute("value") and e
    )
    browser.execute_script(
        "arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
        editor,
        yaml.safe_dump(spec, sort_keys=False),
    )
    before = live_service.http.get("/jobs").json()["total"]
    browser.find_element(By.ID, "submit").click()
    item = until(
        browser,
        20,
        "the field error",
        ec.presence_of_element_located((By.CSS_SELECTOR, 'li[data-field="schedule.lr"]')),
    )
    assert "greater than 0" in item.text
    selected = js(
        browser, "const e = document.getElementById('editor'); return e.value.slice(e.selectionStart, e.selectionEnd)"
    )
    assert selected.strip() == "lr: -1"  # the editor selects the offending line
    assert live_service.http.get("/jobs").json()["total"] == before


def test_study_page_fills_its_leaderboard_and_compare_overlays_children(
    live_service: LiveService, browser: Any
) -> None:
    study = live_service.submit(tiny_study_spec("browser-study"))
    browser.get(f"{live_service.url}/#/jobs/{study['id']}")
    until(browser, 60, "the children", lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr[data-child]")) == 3)
    board = until(
        browser,
        600,
        "the leaderboard to fill",
        lambda d: (b := js(d, "return window.icd.leaderboard")) and len(b) == 2 and all(r["n"] == 1 for r in b) and b,
    )
    assert {r["method"] for r in board} == {"none", "icd"}
    assert all(r["mean"] is not None for r in board)
    rows = browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")
    assert {r.get_attribute("data-method") for r in rows} == {"none", "icd"}
    until(
        browser,
        120,
        "the study to succeed",
        ec.presence_of_element_located((By.CSS_SELECTOR, '#job-head [data-status="succeeded"]')),
    )
    # The report's verdict opens the leaderboard; with one seed it says no gain can be judged yet.
    verdict = until(browser, 30, "the verdict", lambda d: (v := d.find_element(By.ID, "verdict")).is_displayed() and v)
    report = live_service.http.get(f"/jobs/{study['id']}/report").json()
    assert verdict.text == report["verdict"] and verdict.text.startswith("One seed per method cannot separate")
    paired = browser.find_element(By.CSS_SELECTOR, '#leaderboard tr[data-method="icd"] td.paired').text
    assert re.fullmatch(r"[+−]\d+\.\d \(1 seed\)", paired), paired
    # The best student's predictions beside its teacher's, rendered from the run's own PNGs.
    preds = until(browser, 60, "the predictions", lambda d: js(d, "return window.icd.predictions"))
    assert preds["images"] > 0 and preds["teacher"] == preds["images"], preds
    loaded = until(
        browser,
        30,
        "the prediction images to load",
        lambda d: (
            (
                w := js(
                    d,
                    "return [...document.querySelectorAll('#study-predictions img')]"
                    ".map(i => i.complete && i.naturalWidth)",
                )
            )
            and all(w)
            and w
        ),
    )
    assert len(loaded) == 2 * preds["images"]
    assert browser.find_element(By.CSS_SELECTOR, '#study-predictions [data-cost="teacher"]').text.endswith("ms")
    log = live_service.http.get(f"/jobs/{study['id']}/logs").text
    last = log.rstrip().splitlines()[-1]  # the study's log ends with the status it reports
    assert f"study {study['id']} succeeded: AP_" in last, log

    children = live_service.http.get("/jobs", params={"parent_id": study["id"]}).json()["items"]
    ids = ",".join(str(c["id"]) for c in children if c["kind"] == "distill")
    browser.get(f"{live_service.url}/#/compare?ids={ids}&series=loss")
    counts = until(
        browser,
        30,
        "the compare chart",
        lambda d: js(d, "const c = window.icd.charts['compare-series']; return c && c.u && c.pointCount()"),
    )
    assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts

    # An ICD child's page heads its final numbers with AP and the diagnostics that can fail (AUC), not
    # the identification accuracy at a threshold.
    icd_child = next(c for c in children if c["name"].split("/")[-2] == "icd")
    browser.get(f"{live_service.url}/#/jobs/{icd_child['id']}")
    summary = until(
        browser, 30, "the final summary", lambda d: (e := d.find_elements(By.ID, "final-summary")) and e[0].text
    )
    assert "AP " in summary and "icd_ident_auc" in summary and "icd_ident_acc" not in summary, summary
