// A sweep's panel on its job page (docs/sweeps.md): the trials with status, parameters and AP (GET
// /jobs/<id>/trials, live), AP against each searched parameter with pruned trials marked, the best trial,
// and a link comparing the best trial's curves with the others'.

import { api } from "./api.js";
import { esc, fmtNum, isFinished, statusBadge } from "./util.js";

window.icd = window.icd || {};

const fmtParam = (v) => (typeof v === "number" ? Number(v.toPrecision(4)).toString() : String(v));

// AP against one parameter: finished trials as blue points, pruned ones (AP where they stopped) as red.
function paramChart(box, name, dim, trials, metric) {
  const kind = Object.keys(dim)[0];
  const choices = kind === "choice" ? dim.choice.map(String) : null;
  const rows = trials.filter((t) => t.value != null && t.params[name] != null && ["succeeded", "pruned"].includes(t.status))
    .map((t) => ({ x: choices ? choices.indexOf(String(t.params[name])) : Number(t.params[name]), t }))
    .sort((a, b) => a.x - b.x);
  const div = document.createElement("div");
  div.className = "chart";
  div.dataset.param = name;
  box.appendChild(div);
  if (!rows.length) {
    div.innerHTML = `<div class="empty">${esc(name)}: the chart fills in as trials end</div>`;
    return null;
  }
  const pick = (status) => rows.map((r) => (r.t.status === status ? r.t.value : null));
  const x = { time: false, ...(kind === "log_uniform" ? { distr: 3 } : {}) };
  if (choices) x.range = [-0.5, choices.length - 0.5];
  const points = (color) => ({ stroke: color, fill: color, paths: () => null, points: { show: true, size: 8 } });
  return new uPlot({
    title: `${metric} vs ${name}`, width: Math.min(460, Math.max(300, box.clientWidth / 2 - 16)), height: 200,
    scales: { x },
    axes: [{ label: name, values: choices ? (_, ticks) => ticks.map((t) => choices[t] ?? "") : undefined,
      splits: choices ? () => choices.map((_, i) => i) : undefined }, { label: `${metric} (%)`, size: 50 }],
    series: [{ label: name, value: (_, v) => (choices ? choices[v] ?? "" : fmtParam(v)) },
      { label: "finished", ...points("#0969da") }, { label: "pruned", ...points("#cf222e") }],
  }, [rows.map((r) => r.x), pick("succeeded"), pick("pruned")], div);
}

export function sweepPanel(box, sweep) {
  box.innerHTML = `<h2>Trials <span class="muted" id="sw-state"></span></h2>
    <p id="sw-best" class="verdict" hidden></p>
    <div id="trials" class="muted">the sweep creates its trials when a worker starts it</div>
    <h2>${esc(sweep.spec.metric || "AP")} against each parameter</h2><div id="sw-charts" class="charts"></div>
    <p id="sw-compare"></p><p id="sw-report"></p>`;
  let charts = [];
  let finalShown = false;

  async function refresh(job) {
    if (finalShown) return;
    const view = await api.get(`/jobs/${sweep.id}/trials`);
    const names = Object.keys(view.space);
    const metric = view.metric;
    const trials = view.trials;
    box.querySelector("#sw-state").textContent = `(${trials.length}/${view.budget}${isFinished(job) ? `, ${job.status}` : ""})`;
    if (trials.length) {
      box.querySelector("#trials").className = "";
      box.querySelector("#trials").innerHTML = `<table><thead><tr><th class="num">trial</th><th class="num">job</th>
        <th>status</th>${names.map((n) => `<th>${esc(n)}</th>`).join("")}<th class="num">${esc(metric)}</th>
        <th class="num">steps</th><th>note</th></tr></thead><tbody>${trials.map((t) => `
        <tr data-trial="${t.number}" class="${t.number === view.best ? "best" : ""}"><td class="num">${t.number}${t.number === view.best ? " ★" : ""}</td>
        <td class="num"><a href="#/jobs/${t.job_id}">${t.job_id}</a></td><td>${statusBadge(t.status)}</td>
        ${names.map((n) => `<td class="mono">${esc(t.params[n] == null ? "" : fmtParam(t.params[n]))}</td>`).join("")}
        <td class="num">${fmtNum(t.value, 2)}</td><td class="num">${t.steps ?? ""}</td>
        <td class="muted">${["pruned", "failed"].includes(t.status) ? esc(t.reason) : ""}</td></tr>`).join("")}</tbody></table>`;
    }
    const best = trials.find((t) => t.number === view.best);
    const bestBox = box.querySelector("#sw-best");
    bestBox.hidden = !best;
    if (best) {
      bestBox.textContent = `Best so far: trial ${best.number} (job ${best.job_id}), ${names.map((n) => `${n}=${fmtParam(best.params[n])}`)
        .join(", ")}: ${metric} ${fmtNum(best.value, 2)}.`;
      const others = trials.filter((t) => t.job_id !== best.job_id && ["succeeded", "pruned"].includes(t.status)).map((t) => t.job_id);
      box.querySelector("#sw-compare").innerHTML = others.length
        ? `<a class="button" href="#/compare?ids=${[best.job_id, ...others].join(",")}&series=loss">Compare the best trial's curves with the others</a>`
        : "";
    }
    for (const c of charts) c?.destroy();
    const chartBox = box.querySelector("#sw-charts");
    chartBox.replaceChildren();
    charts = names.map((n) => paramChart(chartBox, n, view.space[n], trials, metric));
    window.icd.sweep = { best: view.best, trials: trials.map(({ number, status, value }) => ({ number, status, value })) };
    if (isFinished(job)) {
      finalShown = true;
      if (job.status === "succeeded") {
        box.querySelector("#sw-report").innerHTML = `Report: <a href="/jobs/${sweep.id}/report">JSON</a> ·
          <a href="/jobs/${sweep.id}/report.md">markdown</a>`;
      }
    }
  }

  return { refresh, destroy: () => charts.forEach((c) => c?.destroy()) };
}
