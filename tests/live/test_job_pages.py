"""Job pages read at a glance (issue 21, item 4), checked in headless Chromium on one tiny study run by the
live service: the panels a series goes on, log scale, smoothing and the training-time axis read from the
charts registry; the study's teacher line; compare's difference tables; the predictions lightbox; the
jobs list and study page at 390 px; and `icd status` of an ICD run.

With ICD_JOB_PAGE_SHOTS=<folder>, `test_screenshots` also saves the four pages as PNGs there (the
README of benchmarks/results/job-pages-2026-12-07/ describes them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from tests.helpers import tiny_schedule, tiny_study_spec
from tests.live.conftest import LiveService, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.timeout(1200)]

PHONE = 390


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def until(driver: Any, timeout: float, what: str, cond: Any) -> Any:
    return wait_for(lambda: cond(driver), timeout, what)


@pytest.fixture(scope="module")
def study(live_service: LiveService) -> dict[str, Any]:
    """A finished tiny study (teacher, `none`, `icd`), 40 steps each so the charts have lines and the teacher
    draws boxes: {"id", "teacher", "none", "icd"} (the children as the API returns them)."""
    spec = tiny_study_spec("pages-study")
    spec["teacher_schedule"] = tiny_schedule(40, 20, lr=0.005)
    spec["schedule"] = tiny_schedule(40, 20, lr=0.005)
    job = live_service.submit(spec)
    done = live_service.wait_status(job["id"], {"succeeded", "failed", "canceled"}, timeout=1000)
    assert done["status"] == "succeeded", f"{done['error']}\n{live_service.tail()}"
    children = live_service.http.get("/jobs", params={"parent_id": job["id"]}).json()["items"]
    out: dict[str, Any] = {"id": job["id"]}
    for c in children:
        key = "teacher" if c["kind"] == "train" else c["name"].split("/")[-2]
        out[key] = live_service.job(c["id"])
    return out


def job_page(browser: Any, service: LiveService, job_id: int) -> None:
    browser.get(f"{service.url}/#/jobs/{job_id}")
    until(browser, 60, "the page to stop polling", lambda d: js(d, "return window.icd.jobPage?.stopped") is True)


def counts(browser: Any) -> dict[str, dict[str, int]]:
    return js(
        browser,
        "return Object.fromEntries(Object.entries(window.icd.charts).map(([k, c]) => [k, c.pointCount()]))",
    )


def test_panel_rule_puts_losses_by_name_and_everything_else_a_distiller_reports_apart(
    live_service: LiveService, browser: Any
) -> None:
    browser.get(f"{live_service.url}/")
    expected = {
        "loss": "losses",
        "classification": "losses",
        "bbox_regression": "losses",
        "bbox_ctrness": "losses",
        "loss_classifier": "losses",
        "loss_box_reg": "losses",
        "loss_objectness": "losses",
        "loss_rpn_box_reg": "losses",
        "loss_icd_ident": "distill",
        "loss_fitnet": "distill",
        "loss_fgd_fg": "distill",
        "loss_defeat_bg": "distill",
        "lr": "lr",
        "lr_distill": "lr",
        "icd_ident_auc": "diagnostics",
        "icd_real_recall": "diagnostics",
        "icd_inbox_mass": "diagnostics",
        "icd_inbox_uniform": "diagnostics",
        "icd_loc_error": "diagnostics",
        "fgd_total": "diagnostics",
        "a_name_nobody_logs_yet": "diagnostics",  # never the losses panel by accident
        "icd_real_queries": "counts",
        "icd_fake_queries": "counts",
        "icd_decoders": "counts",
        "sec_per_step": "time",
        "data_time": "time",
        "peak_memory_mb": "memory",
    }
    got = browser.execute_async_script(
        """const [names, done] = arguments;
        import("/static/dashboard/panels.js")
          .then((m) => done(Object.fromEntries(names.map((n) => [n, m.panelOf(n)]))));""",
        list(expected),
    )
    assert got == expected
    # The run's context: the total loss of a distillation run sits with its distillation terms (it includes
    # them); a diagnostic outside [0, 1] gets its own y axis so the fractions keep theirs.
    context = browser.execute_async_script(
        """const done = arguments[0];
        import("/static/dashboard/panels.js").then((m) => done([
          m.panelOf("loss", {names: ["loss", "classification", "loss_icd_ident"]}),
          m.panelOf("loss", {names: ["loss", "loss_classifier", "loss_box_reg"]}),
          m.panelOf("icd_attn_entropy", {points: [[1, 4.4], [2, 4.3]]}),
          m.panelOf("icd_ident_auc", {points: [[1, 0.6], [2, 1.0]]}),
        ]));"""
    )
    assert context == ["distill", "losses", "scales", "diagnostics"]


def test_icd_job_page_panels_log_scale_smoothing_and_training_time_axis(
    live_service: LiveService, browser: Any, study: dict[str, Any]
) -> None:
    icd = study["icd"]
    job_page(browser, live_service, icd["id"])
    charts = until(browser, 30, "the diagnostics chart", lambda d: (c := counts(d)).get("diagnostics") and c)
    assert charts["diagnostics"]["icd_ident_auc"] > 0 and charts["diagnostics"]["icd_inbox_mass"] > 0
    assert set(charts["losses"]) == {"classification", "bbox_regression"}, charts["losses"]
    assert {"loss", "loss_icd_ident", "loss_icd_distill"} <= set(charts["distill"])
    assert "icd_real_queries" in charts["counts"] and "icd_real_queries" not in charts["diagnostics"]
    assert "icd_attn_entropy" in charts["scales"]  # nats, not a fraction: off the fractions' axis
    assert set(charts["lr"]) == {"lr", "lr_distill"} and set(charts["time"]) == {"sec_per_step", "data_time"}

    # Log scale: the toggle switches uPlot's y distribution (3: log) and back.
    def distr(chart: str) -> int:
        return js(browser, f"return window.icd.charts['{chart}'].u.scales.y.distr")

    assert distr("losses") == 1 and distr("lr") == 3  # learning rates start on a log axis
    browser.find_element(By.CSS_SELECTOR, '[data-chart="losses"] [data-log]').click()
    assert distr("losses") == 3
    browser.find_element(By.CSS_SELECTOR, '[data-chart="losses"] [data-log]').click()
    assert distr("losses") == 1

    # Smoothing: a raw line under each smoothed one (out of the legend); at 0 only the raw lines.
    labels = js(browser, "return window.icd.charts.losses.u.series.slice(1).map(s => s.label)")
    assert "classification" in labels and "classification (raw)" in labels
    js(
        browser,
        """const s = document.querySelector('[data-chart="losses"] [data-smooth]');
        s.value = 0; s.dispatchEvent(new Event('input'));""",
    )
    labels = js(browser, "return window.icd.charts.losses.u.series.slice(1).map(s => s.label)")
    assert "classification" in labels and not any(x.endswith("(raw)") for x in labels)

    # The x axis: training time from the logged step times, the same axis on every chart.
    steps = js(browser, "return window.icd.charts.losses.u.data[0]")
    browser.find_element(By.CSS_SELECTOR, '#x-axis input[value="time"]').click()
    axes = js(browser, "return Object.values(window.icd.charts).map(c => c.u.axes[0].label)")
    assert set(axes) == {"training time"}
    secs = js(browser, "return window.icd.charts.losses.u.data[0]")
    sps = js(browser, "const s = window.icd.charts.time.series.get('sec_per_step'); return [s.xs, s.ys]")
    assert len(secs) == len(steps) and all(b > a for a, b in zip(secs, secs[1:], strict=False))
    expected_end = sum(y * (x - px) for x, y, px in zip(sps[0], sps[1], [0, *sps[0][:-1]], strict=True))
    assert secs[-1] == pytest.approx(expected_end, rel=1e-6)
    tip = browser.find_element(By.CSS_SELECTOR, '#x-axis label[title*="sec_per_step"]')
    assert "computed in the browser" in tip.get_attribute("title")
    browser.find_element(By.CSS_SELECTOR, '#x-axis input[value="step"]').click()
    assert js(browser, "return window.icd.charts.ap.u.axes[0].label") == "step"

    duration = browser.find_element(By.ID, "run-duration").text
    assert re.search(r"duration\s*\d+ (s|min) · training \d+ (s|min)", duration), duration


def test_study_page_draws_the_teachers_ap_and_a_final_fact(
    live_service: LiveService, browser: Any, study: dict[str, Any]
) -> None:
    browser.get(f"{live_service.url}/#/jobs/{study['id']}")
    chart = until(browser, 60, "the leaderboard chart", lambda d: js(d, "return window.icd.studyChart"))
    report = live_service.http.get(f"/jobs/{study['id']}/report").json()
    assert chart["teacherAp"] == pytest.approx(report["teacher"]["AP"])
    assert chart["teacherAp"] == pytest.approx(study["teacher"]["final_metrics"]["AP"])
    final = browser.find_element(By.ID, "final-summary").text
    assert re.fullmatch(r"final\s*AP (none|icd) \d+\.\d\d · AP (none|icd) \d+\.\d\d", final), final


def test_compare_lists_spec_and_metric_differences_and_defaults_to_the_detection_loss(
    live_service: LiveService, browser: Any, study: dict[str, Any]
) -> None:
    none, icd = study["none"], study["icd"]
    browser.get(f"{live_service.url}/#/compare?ids={none['id']},{icd['id']}")
    state = until(browser, 60, "the compare view", lambda d: js(d, "return window.icd.compare"))
    assert state["series"] == "detection loss"  # never the total loss, which includes the distillation term
    row = browser.find_element(By.CSS_SELECTOR, '#spec-diff tr[data-path="distill.method"]')
    assert [td.text for td in row.find_elements(By.TAG_NAME, "td")] == ["distill.method", "none", "icd"]
    assert "seed" not in state["diffPaths"] and "name" not in state["diffPaths"]  # the same in both, or the label
    metric = browser.find_element(By.CSS_SELECTOR, '#metric-diff tr[data-metric="icd_ident_auc"]')
    cells = [td.text for td in metric.find_elements(By.TAG_NAME, "td")]
    assert cells[1] == "–" and float(cells[2]) == pytest.approx(icd["final_metrics"]["icd_ident_auc"], abs=1e-3)
    points = js(browser, "return window.icd.charts['compare-series'].pointCount()")
    assert len(points) == 2 and all(n > 0 for n in points.values()), points
    # The detection loss is the detector's terms summed, not the total `loss`.
    m = live_service.http.get(f"/jobs/{icd['id']}/metrics", params={"names": "classification,bbox_regression"}).json()
    first = m["series"]["classification"][0][1] + m["series"]["bbox_regression"][0][1]
    shown = js(browser, "return [...window.icd.charts['compare-series'].series.values()].map(s => s.ys[0])")
    assert any(v == pytest.approx(first) for v in shown), (first, shown)


def test_predictions_open_large_with_class_toggles_and_say_when_nothing_passed(
    live_service: LiveService, browser: Any, study: dict[str, Any]
) -> None:
    teacher = study["teacher"]
    job_page(browser, live_service, teacher["id"])
    preds = until(browser, 60, "the predictions", lambda d: js(d, "return window.icd.predictions"))
    coco = live_service.http.get(f"/jobs/{teacher['id']}/predictions/detections.json").json()
    floor = coco["info"]["drawn_score_min"]
    per_image = {
        i["id"]: sum(1 for a in coco["annotations"] if a["image_id"] == i["id"] and a["score"] >= floor)
        for i in coco["images"]
    }
    assert preds["empty"] == sum(1 for n in per_image.values() if n == 0)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#predictions .no-det")) == preds["empty"]
    for note in browser.find_elements(By.CSS_SELECTOR, "#predictions .no-det"):
        assert note.text == f"no detection ≥ {floor:.2f}"
    assert max(per_image.values()) > 0, "the 40-step teacher drew no box above the threshold on any image"

    best = max(range(len(coco["images"])), key=lambda i: per_image[coco["images"][i]["id"]])
    browser.find_elements(By.CSS_SELECTOR, "#predictions [data-open]")[best].click()
    box = until(browser, 20, "the lightbox", lambda d: (b := js(d, "return window.icd.lightbox")) and b["open"] and b)
    assert box["raw"] and box["drawn"] == box["total"] == per_image[coco["images"][best]["id"]]
    size = js(browser, "const c = document.getElementById('lb-canvas'); return [c.width, c.height]")
    assert min(size) >= 4 * 64  # a 64 px validation image opens at least 4x
    name, _ = next(iter(box["classes"].items()))
    hidden = sum(
        1
        for a in coco["annotations"]
        if a["image_id"] == coco["images"][best]["id"]
        and a["score"] >= floor
        and next(c["name"] for c in coco["categories"] if c["id"] == a["category_id"]) == name
    )
    browser.find_element(By.CSS_SELECTOR, f'#lightbox [data-class="{name}"]').click()
    toggled = lambda d: (b := js(d, "return window.icd.lightbox"))["classes"][name] is False and b  # noqa: E731
    box = until(browser, 10, "the class toggle", toggled)  # it may land after the click returns
    assert box["classes"][name] is False and box["drawn"] == box["total"] - hidden
    browser.find_element(By.ID, "lb-close").click()
    assert js(browser, "return window.icd.lightbox.open") is False


def phone(browser: Any, height: int = 900) -> None:
    browser.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": PHONE, "height": height, "deviceScaleFactor": 1, "mobile": True},
    )


def test_jobs_list_and_study_page_fit_a_phone(live_service: LiveService, browser: Any, study: dict[str, Any]) -> None:
    phone(browser)
    browser.get(f"{live_service.url}/#/")
    until(browser, 30, "the list", lambda d: d.find_elements(By.CSS_SELECTOR, f'tr[data-job="{study["id"]}"]'))
    assert js(browser, "return window.innerWidth") == PHONE
    assert js(browser, "return document.documentElement.scrollWidth") <= PHONE
    browser.get(f"{live_service.url}/#/jobs/{study['id']}")
    until(browser, 60, "the leaderboard chart", lambda d: js(d, "return window.icd.studyChart"))
    until(browser, 60, "the predictions", lambda d: js(d, "return window.icd.predictions"))
    assert js(browser, "return document.documentElement.scrollWidth") <= PHONE


def test_cli_status_of_an_icd_run_is_a_short_rounded_block(live_service: LiveService, study: dict[str, Any]) -> None:
    icd = study["icd"]
    r = subprocess.run(
        [sys.executable, "-m", "icd_cli", "status", str(icd["id"])],
        env=live_service.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"job {icd['id']}  {icd['name']}  (distill)  succeeded"
    assert re.search(r"^  eval +AP \d+\.\d\d · AP50 \d+\.\d\d · AP75 \d+\.\d\d$", r.stdout, re.M), r.stdout
    assert re.search(r"^  ICD +ident_auc \d\.\d{3} · real_recall \d\.\d{3} · inbox_mass", r.stdout, re.M), r.stdout
    assert "{" not in r.stdout and len(lines) <= 10 and all(len(x) <= 120 for x in lines), r.stdout
    full = subprocess.run(
        [sys.executable, "-m", "icd_cli", "status", str(icd["id"]), "--json"],
        env=live_service.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert '"icd_ident_auc"' in full.stdout and '"cost_latency_ms"' in full.stdout


@pytest.mark.skipif(not os.environ.get("ICD_JOB_PAGE_SHOTS"), reason="set ICD_JOB_PAGE_SHOTS=<folder> for PNGs")
def test_screenshots(live_service: LiveService, browser: Any, study: dict[str, Any]) -> None:
    out = Path(os.environ["ICD_JOB_PAGE_SHOTS"])
    out.mkdir(parents=True, exist_ok=True)

    def shot(name: str, ready: str, width: int = 1400) -> None:
        if width != PHONE:
            browser.set_window_size(width, 900)  # the page's own height, not the last page's window
        until(browser, 60, f"{name} to render", lambda d: js(d, f"return {ready}"))
        time.sleep(1)  # fonts and the last chart resize
        height = js(browser, "return document.documentElement.scrollHeight")
        if width == PHONE:
            phone(browser, height)
        else:
            browser.set_window_size(width, height + 140)
        time.sleep(0.5)
        browser.save_screenshot(str(out / f"{name}.png"))

    job_page(browser, live_service, study["icd"]["id"])
    shot("icd-job", "window.icd.predictions && window.icd.charts.diagnostics && window.icd.charts.diagnostics.u")
    browser.get(f"{live_service.url}/#/jobs/{study['id']}")
    shot("study", "window.icd.studyChart && window.icd.predictions")
    browser.get(f"{live_service.url}/#/compare?ids={study['none']['id']},{study['icd']['id']}")
    shot("compare", "window.icd.compare")
    phone(browser)
    browser.get(f"{live_service.url}/#/")
    shot("jobs-list-390px", f"document.querySelector('tr[data-job=\"{study['id']}\"]')", width=PHONE)
