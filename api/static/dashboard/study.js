// A study's panel on its job page: the children and their states, and the leaderboard (mean ± std AP per
// method over seeds) computed from the children as they finish, as a table and a bar chart.

import { api } from "./api.js";
import { leaderboardChart } from "./lbchart.js";
import { predictionsPanel } from "./predictions.js";
import { esc, fmtNum, isFinished, progressBar, statusBadge } from "./util.js";

window.icd = window.icd || {};

// The study's row of a child: its method, `icd_pretrained` when its decoder is pre-trained (as the report).
function studyMethod(spec) {
  const d = spec?.distill;
  if (!d) return "?";
  return d.method === "icd" && (d.icd?.pretrain || d.icd?.decoder) ? "icd_pretrained" : d.method;
}

// "weight 0.25, adapter_lr 0.003" from {"distill.weight": 0.25, "distill.icd.adapter_lr": 0.003}.
function settingText(setting) {
  if (!setting) return "";
  const short = (v) => (typeof v === "number" ? Number(v.toPrecision(3)).toString() : String(v));
  return Object.entries(setting).map(([k, v]) => `${k.split(".").pop()} ${short(v)}`).join(", ");
}

// A tuned study's table: each method's best setting and what its sweep cost (report.tuning).
function tuningTable(tuning) {
  if (!tuning) return "";
  const split = tuning.split || {};
  const rows = Object.entries(tuning.methods || {}).map(([method, t]) => {
    const c = t.counts || {};
    const trials = Object.values(c).reduce((a, b) => a + b, 0);
    const sweep = t.sweep_job_id ? `<a href="#/jobs/${t.sweep_job_id}">${t.sweep_job_id}</a>` : "";
    return `<tr data-tuned="${esc(method)}"><td>${esc(method)}</td><td>${esc(settingText(t.best_params) || "paper setting")}</td>
      <td class="num">${fmtNum(t.best_value, 1)}</td><td class="num">${trials}</td><td class="num">${c.pruned ?? 0}</td>
      <td class="num">${fmtNum(t.wall_s, 0)}</td><td class="num">${sweep}</td></tr>`;
  });
  return `<h2>Tuning</h2><p class="muted">Each method's setting was found on ${Math.round(100 * (split.fraction ?? 0))} % of
    data.train held out (seed ${esc(String(split.seed ?? ""))}); the leaderboard's data.val was not used.</p>
    <table id="tuning"><thead><tr><th>method</th><th>best setting</th><th class="num">tuning AP</th><th class="num">trials</th>
    <th class="num">pruned</th><th class="num">wall s</th><th class="num">sweep</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

function leaderboard(children) {
  const byMethod = new Map();
  for (const c of children.filter((c) => c.kind === "distill")) {
    const method = studyMethod(c.spec);
    const row = byMethod.get(method) || { method, aps: [], total: 0, running: 0 };
    row.total++;
    if (c.status === "succeeded" && c.final_metrics?.AP != null) row.aps.push(c.final_metrics.AP);
    if (!isFinished(c)) row.running++;
    byMethod.set(method, row);
  }
  const rows = [...byMethod.values()].map((r) => {
    const n = r.aps.length;
    const mean = n ? r.aps.reduce((a, b) => a + b, 0) / n : null;
    const std = n > 1 ? Math.sqrt(r.aps.reduce((a, b) => a + (b - mean) ** 2, 0) / (n - 1)) : null;
    return { ...r, n, mean, std };
  });
  const base = rows.find((r) => r.method === "none")?.mean;
  for (const r of rows) r.delta = base != null && r.mean != null ? r.mean - base : null;
  return rows.sort((a, b) => (b.mean ?? -1) - (a.mean ?? -1));
}

// "+2.1 [+0.4, +3.8]"; "≈0" marks an interval containing 0 (not distinguishable from `none`).
function pairedText(p) {
  if (!p) return "";
  const signed = (v) => (v >= 0 ? "+" : "−") + Math.abs(v).toFixed(1);
  if (p.ci_low == null) return `${signed(p.mean)} (${p.n} seed${p.n === 1 ? "" : "s"})`;
  return `${signed(p.mean)} [${signed(p.ci_low)}, ${signed(p.ci_high)}]${p.distinguishable ? "" : " ≈0"}`;
}

export function studyPanel(box, study) {
  box.innerHTML = `<h2>Children</h2><div id="children" class="muted">none yet</div>
    <h2>Leaderboard <span class="muted" id="lb-state"></span></h2>
    <p id="verdict" class="verdict" hidden></p>
    <table id="leaderboard"><thead><tr><th>method</th><th class="num">AP mean</th><th class="num">± std</th>
      <th class="num">Δ vs none</th><th class="num" title="mean of (method − none) over shared seeds, 95 % t interval">paired Δ (95 % CI)</th>
      <th>setting</th><th class="num">seeds done</th></tr></thead><tbody></tbody></table><div id="tuning-box"></div>
    <div class="chart" id="lb-chart" style="margin-top:.8em;max-width:680px"></div>
    <p id="compare-children"></p><p id="report-links"></p><div id="study-predictions"></div>`;
  let bars = null;
  let finalShown = false;

  async function refresh(job) {
    if (finalShown) return;
    const children = (await api.get(`/jobs?parent_id=${study.id}&limit=500`)).items.reverse();
    const details = await Promise.all(children.map((c) => (c.kind === "distill" ? api.get(`/jobs/${c.id}`) : c)));
    box.querySelector("#children").className = "";
    box.querySelector("#children").innerHTML = children.length ? `<table><thead><tr><th class="num">id</th><th>name</th>
      <th>kind</th><th>status</th><th>progress</th><th class="num">AP</th></tr></thead><tbody>${details.map((c) => `
      <tr data-child="${c.id}"><td class="num"><a href="#/jobs/${c.id}">${c.id}</a></td><td>${esc(c.name)}</td>
      <td>${esc(c.kind)}${c.spec?.distill ? ` · ${esc(studyMethod(c.spec))}` : ""}</td><td>${statusBadge(c.status)}</td>
      <td>${progressBar(c)}</td><td class="num">${fmtNum(c.final_metrics?.AP, 2)}</td></tr>`).join("")}</tbody></table>`
      : `<span class="muted">the study creates its children when a worker starts it</span>`;
    const rows = leaderboard(details);
    const report = isFinished(job) && job.status === "succeeded" ? await api.get(`/jobs/${study.id}/report`).catch(() => null) : null;
    // Report rows are labelled "icd (adapter_lr=0.001)" when a knob is set; the dashboard groups by method.
    const byBase = Object.fromEntries((report?.methods ?? []).map((m) => [m.method.split(" (")[0], m]));
    const paired = Object.fromEntries(Object.entries(byBase).map(([k, m]) => [k, m.paired_delta_AP]));
    box.querySelector("#leaderboard tbody").innerHTML = rows.map((r) => `
      <tr data-method="${esc(r.method)}"><td>${esc(r.method)}</td><td class="num">${fmtNum(r.mean, 2)}</td>
      <td class="num">${fmtNum(r.std, 2)}</td><td class="num">${r.delta == null ? "" : (r.delta >= 0 ? "+" : "") + fmtNum(r.delta, 2)}</td>
      <td class="num paired">${pairedText(paired[r.method])}</td><td class="setting">${esc(settingText(byBase[r.method]?.setting))}</td>
      <td class="num">${r.n}/${r.total}</td></tr>`).join("");
    box.querySelector("#tuning-box").innerHTML = tuningTable(report?.tuning);
    if (report?.verdict) {
      const verdict = box.querySelector("#verdict");
      verdict.textContent = report.verdict;
      verdict.hidden = false;
    }
    const students = children.filter((c) => c.kind === "distill").map((c) => c.id);
    box.querySelector("#compare-children").innerHTML = students.length > 1
      ? `<a class="button" href="#/compare?ids=${students.join(",")}">Compare the students' curves</a>` : "";
    box.querySelector("#lb-state").textContent = isFinished(job) ? `(${job.status})` : "(filling in)";
    bars?.destroy();
    // The teacher's AP: the report's teacher row, else (before the report) the teacher the study trained.
    const teacherAp = report?.teacher?.AP ?? details.find((c) => c.kind === "train")?.final_metrics?.AP;
    bars = leaderboardChart(box.querySelector("#lb-chart"), rows, teacherAp);
    window.icd.leaderboard = rows.map(({ method, mean, n, total }) => ({ method, mean, n, total }));
    if (isFinished(job)) {
      finalShown = true;
      if (job.status === "succeeded") {
        box.querySelector("#report-links").innerHTML = `Report: <a href="/jobs/${study.id}/report">JSON</a> ·
          <a href="/jobs/${study.id}/report.md">markdown</a> · <a href="/jobs/${study.id}/report.png">chart</a> ·
          <a href="/jobs/${study.id}/report/ap_latency.png">AP vs latency</a>`;
      }
      // The best finished student beside its teacher, on the same validation images.
      const best = details.filter((c) => c.kind === "distill" && c.status === "succeeded" && c.final_metrics?.AP != null)
        .sort((a, b) => b.final_metrics.AP - a.final_metrics.AP)[0];
      if (best) {
        await predictionsPanel(box.querySelector("#study-predictions"), best);
        box.querySelector("#study-predictions h2").textContent =
          `Best student (${best.spec.distill.method}, job ${best.id}) and the teacher`;
      }
    }
  }

  return { refresh, destroy: () => bars?.destroy() };
}
