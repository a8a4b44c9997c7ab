// One job's page (#/jobs/<id>): status and actions, live charts of every metric series and the AP curves,
// spec, log tail, checkpoints; a study also shows its children and leaderboard (study.js).
// Live updates poll incrementally (metrics and evaluations since the last step, the log from its last
// byte offset) and stop once the job is finished.

import { api, token } from "./api.js";
import { AP_KEYS, apSeries, LineChart } from "./charts.js";
import { xAxisToggle } from "./xaxis.js";
import { durationFact, finalFact } from "./facts.js";
import { PANEL_ORDER, PANELS, panelOf } from "./panels.js";
import { predictionsPanel } from "./predictions.js";
import { studyPanel } from "./study.js";
import { sweepPanel } from "./sweep.js";
import { esc, flash, fmtBytes, fmtDuration, fmtNum, fmtTime, isFinished, progressBar, statusBadge } from "./util.js";

const POLL_MS = 2000;
const FIRST_MAX_POINTS = 1000; // first load: downsampled server-side; later polls fetch only new steps
const LOG_LINES = 400;

/** A plain link cannot send the bearer token: with a token set, fetch the file with it and save the blob. */
async function downloadWithToken(event) {
  if (!token.get()) return; // the browser's own download
  event.preventDefault();
  const a = event.currentTarget;
  try {
    const r = await fetch(a.href, { headers: { Authorization: `Bearer ${token.get()}` } });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const url = URL.createObjectURL(await r.blob());
    const save = Object.assign(document.createElement("a"), { href: url, download: a.href.split("/").pop() });
    save.click();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  } catch (err) {
    flash(`download failed: ${err.message}`);
  }
}

// A distill job's teacher, evaluated on the validation set before training (icd_core/teacher_eval.py).
const teacherFact = (metrics) =>
  typeof metrics?.teacher_AP === "number"
    ? `<div id="teacher-summary"><span>teacher</span>AP ${fmtNum(metrics.teacher_AP, 2)}` +
      `${typeof metrics.teacher_AP50 === "number" ? ` · AP50 ${fmtNum(metrics.teacher_AP50, 2)}` : ""}</div>`
    : "";
const fact = (label, value) => (value === "" || value == null ? "" : `<div><span>${label}</span>${value}</div>`);

export function jobView(main, jobId) {
  let stopped = false;
  let timer = null;
  const charts = new Map(); // panel -> LineChart
  const panelOfSeries = new Map(); // name -> panel, fixed at its first points so a line never moves
  let xAxis = null; // the page-wide step / training-time switch
  const cursor = { metricsStep: null, evalStep: null, logOffset: 0, evalCount: 0, status: null, ticks: 0 };
  let study = null;

  main.innerHTML = `
    <div id="job-head"><p class="muted">Loading job ${jobId}…</p></div>
    <div class="actions">
      <button id="cancel" class="danger">Cancel</button><button id="retry">Retry</button>
      <button id="delete" class="danger">Delete</button><a id="clone" class="button" href="#/submit?clone=${jobId}">Clone and edit</a>
      <a class="button" href="#/compare?ids=${jobId}">Compare…</a>
    </div>
    <div id="study"></div>
    <div id="training"><h2>Charts <span id="x-axis"></span></h2><div class="charts" id="charts"><p class="muted" id="no-charts">No metrics yet.</p></div>
    <h2>Checkpoints</h2><div id="checkpoints" class="muted">none yet</div><div id="predictions"></div></div>
    <div class="two">
      <div><h2>Log <span class="muted" id="log-state"></span></h2><pre class="log" id="log"></pre></div>
      <div><h2>Spec</h2><pre class="spec" id="spec"></pre></div>
    </div>`;
  const $ = (sel) => main.querySelector(sel);

  async function act(what, call) {
    try {
      await call();
      flash(`job ${jobId}: ${what} done`, "ok");
    } catch (err) {
      flash(`${what} failed: ${err.message}`);
    }
    restart();
  }
  $("#cancel").onclick = () => act("cancel", () => api.post(`/jobs/${jobId}/cancel`));
  $("#retry").onclick = () => act("retry", () => api.post(`/jobs/${jobId}/retry`));
  $("#delete").onclick = async () => {
    if (!confirm(`Delete job ${jobId}, its results and its files?`)) return;
    try {
      await api.del(`/jobs/${jobId}`);
      flash(`job ${jobId} deleted`, "ok");
      location.hash = "#/";
    } catch (err) {
      flash(`delete failed: ${err.message}`);
    }
  };

  function renderHead(job) {
    const eta = job.status === "running" && job.eta_s != null ? fmtDuration(job.eta_s) : "";
    const preempted = (job.attempts || []).filter((a) => a.status === "preempted").pop();
    const deps = job.depends_on.length ? job.depends_on.map((d) => `<a href="#/jobs/${d}">${d}</a>`).join(", ") : "";
    $("#job-head").innerHTML = `
      <h1>${esc(job.name)} <span class="muted">#${job.id} · ${esc(job.kind)}</span> ${statusBadge(job.status)}</h1>
      <div id="progress">${progressBar(job, true)} <span class="muted">${job.kind === "study" ? "children ended" : job.kind === "sweep" ? "trials ended" : "steps"}
        ${job.progress_step}${job.progress_total ? "/" + job.progress_total : ""}</span> ${eta ? `· ETA <b>${eta}</b>` : ""}</div>
      <div class="facts">
        ${fact("attempt", job.attempt)}${fact("worker", esc(job.worker))}${fact("queue", esc(job.queue))}
        ${fact("priority", job.priority ?? 0)}${job.preemptions ? fact("preempted", `${job.preemptions}×`) : ""}
        ${fact("s/step", fmtNum(job.sec_per_step, 3))}${fact("created", fmtTime(job.created_at))}
        ${fact("started", fmtTime(job.started_at))}${fact("finished", fmtTime(job.finished_at))}
        ${job.parent_id ? `<div><span>parent</span><a href="#/jobs/${job.parent_id}">${job.parent_id}</a></div>` : ""}
        ${deps ? `<div><span>waits for</span>${deps}</div>` : ""}
        <div id="run-duration">${durationFact(job, xAxis?.clock.total())}</div>${finalFact(job)}
        ${teacherFact(job.final_metrics)}
      </div>
      ${job.status_detail ? `<div class="muted" id="job-wait">${esc(job.status_detail)}</div>`
        : preempted ? `<div class="muted" id="job-wait">attempt ${preempted.number} ${esc(preempted.error)}</div>` : ""}
      ${job.error ? `<div class="error" id="job-error">${esc(job.error)}</div>` : ""}`;
    const active = !isFinished(job);
    $("#cancel").disabled = !active || job.cancel_requested;
    $("#retry").disabled = !["failed", "canceled"].includes(job.status);
    $("#delete").disabled = active;
    $("#log-state").textContent = active ? "(live)" : "";
    document.title = `${job.name} · ICD`;
  }

  function chartFor(group) {
    if (!charts.has(group)) {
      $("#no-charts")?.remove();
      const box = document.createElement("div");
      box.className = "chart";
      box.dataset.chart = group;
      const rank = (g) => PANEL_ORDER.indexOf(g);
      const after = [...$("#charts").children].find((c) => rank(c.dataset.chart) > rank(group));
      $("#charts").insertBefore(box, after || null);
      charts.set(group, xAxis.apply(new LineChart(box, group, PANELS[group])));
    }
    return charts.get(group);
  }

  async function pollMetrics() {
    const q = cursor.metricsStep == null ? `max_points=${FIRST_MAX_POINTS}` : `since_step=${cursor.metricsStep}`;
    const m = await api.get(`/jobs/${jobId}/metrics?${q}`);
    if (m.last_step != null) cursor.metricsStep = Math.max(cursor.metricsStep ?? -1, m.last_step);
    else if (cursor.metricsStep == null) cursor.metricsStep = -1;
    const byGroup = {};
    const names = Object.keys(m.series);
    for (const [name, pts] of Object.entries(m.series)) {
      if (!panelOfSeries.has(name)) panelOfSeries.set(name, panelOf(name, { names, points: pts }));
      (byGroup[panelOfSeries.get(name)] ||= {})[name] = pts;
    }
    for (const [group, series] of Object.entries(byGroup)) chartFor(group).append(series);
  }

  async function pollEvaluations() {
    const q = cursor.evalStep == null ? "" : `?since_step=${cursor.evalStep}`;
    const evals = await api.get(`/jobs/${jobId}/evaluations${q}`);
    if (!evals.length) return false;
    cursor.evalStep = Math.max(cursor.evalStep ?? -1, ...evals.map((e) => e.step));
    cursor.evalCount += evals.length;
    chartFor("ap").append(apSeries(evals, AP_KEYS));
    return true;
  }

  async function pollLog() {
    const q = cursor.logOffset ? `offset=${cursor.logOffset}` : `tail=${LOG_LINES}`;
    const { text, offset } = await api.text(`/jobs/${jobId}/logs?${q}`);
    cursor.logOffset = offset;
    if (!text) return;
    const pre = $("#log");
    const stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
    const lines = (pre.textContent + text).split("\n");
    pre.textContent = lines.slice(-LOG_LINES * 2).join("\n");
    if (stick) pre.scrollTop = pre.scrollHeight;
  }

  async function loadCheckpoints() {
    const cks = await api.get(`/jobs/${jobId}/checkpoints`);
    $("#checkpoints").className = "";
    $("#checkpoints").innerHTML = cks.length ? `<table><thead><tr><th>name</th><th class="num">step</th>
      <th class="num">attempt</th><th class="num">size</th><th>sha256</th><th></th></tr></thead><tbody>${cks.map((c) => `
      <tr><td><a href="${esc(c.url)}" download>${esc(c.name)}</a>${c.final ? " <b>final</b>" : ""}</td>
      <td class="num">${c.step}</td><td class="num">${c.attempt}</td><td class="num">${fmtBytes(c.size_bytes)}</td>
      <td class="mono" title="${esc(c.sha256)}">${esc(c.sha256)}</td><td><a href="${esc(c.url)}" download>download</a></td></tr>`).join("")}
      </tbody></table>` : `<span class="muted">none yet</span>`;
    for (const a of $("#checkpoints").querySelectorAll("a[download]")) a.onclick = downloadWithToken;
  }

  async function tick() {
    if (stopped) return;
    let job;
    try {
      job = await api.get(`/jobs/${jobId}`);
    } catch (err) {
      $("#job-head").innerHTML = `<h1>Job ${jobId}</h1><p class="error">${esc(err.message)}</p>`;
      return;
    }
    if (stopped) return;
    const first = cursor.status === null;
    const changed = cursor.status !== job.status;
    cursor.status = job.status;
    renderHead(job);
    if (first) {
      $("#spec").textContent = jsyaml.dump(job.spec, { lineWidth: 120, noRefs: true });
      if (job.kind === "study") {
        study = studyPanel($("#study"), job);
        $("#training").hidden = true; // a study trains nothing itself: its children have the curves
      }
      if (job.kind === "sweep") {
        study = sweepPanel($("#study"), job); // the same place and polling as a study's panel
        $("#training").hidden = true;
      }
      if (job.kind === "export") $("#training").hidden = true; // its files: GET /jobs/{source}/exports
    }
    try {
      const [, newEval] = await Promise.all([pollMetrics(), pollEvaluations(), pollLog(), study?.refresh(job)]);
      if (first || changed || newEval || cursor.ticks % 5 === 0) await loadCheckpoints();
      $("#run-duration").innerHTML = durationFact(job, xAxis.clock.total());
      if ((first || changed) && job.status === "succeeded" && ["train", "distill"].includes(job.kind)) {
        await predictionsPanel($("#predictions"), job);
      }
    } catch (err) {
      flash(`job ${jobId}: ${err.message}`);
    }
    cursor.ticks++;
    window.icd.jobPage = { jobId, status: job.status, step: job.progress_step, polls: cursor.ticks };
    if (!stopped && !isFinished(job)) timer = setTimeout(tick, POLL_MS);
    else if (window.icd.jobPage) window.icd.jobPage.stopped = true;
  }

  function restart() {
    clearTimeout(timer);
    tick();
  }

  xAxis = xAxisToggle($("#x-axis"), () => charts.get("time")?.series.get("sec_per_step"), () => charts);
  const onResize = () => charts.forEach((c) => c.resize());
  window.addEventListener("resize", onResize);
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
    window.removeEventListener("resize", onResize);
    charts.forEach((c) => c.destroy());
    study?.destroy();
  };
}
