// A sweep's panel on its job page (docs/sweeps.md): the trials with status, parameters and AP (GET
// /jobs/<id>/trials, live), AP against each searched parameter with pruned trials marked and the best
// trial ringed, the best trial's AP curve over its evaluations beside the other trials', and a link
// comparing the best trial's curves with the others' in full.
//
// window.icd.sweep is what the browser tests read: the trials, the best, and each chart's uPlot with the
// trial behind every point or line (tests/live/test_sweep_page.py).

import { api } from "./api.js";
import { STEP_INCRS } from "./charts.js";
import { esc, fmtNum, isFinished, statusBadge } from "./util.js";

window.icd = window.icd || {};

const fmtParam = (v) => (typeof v === "number" ? Number(v.toPrecision(4)).toString() : String(v));

// The status badges' colours (style.css), so a point or a line reads as its row does.
export const COLORS = { succeeded: "#0969da", pruned: "#8250df", failed: "#cf222e", best: "#bf8700", other: "#8c959f" };

const points = (color, fill, size, width = 1) => ({
  stroke: color, fill, width, paths: () => null, points: { show: true, size, width, stroke: color, fill },
});

// AP against one parameter: finished trials as filled blue points, pruned ones (AP where they stopped) as
// hollow purple rings, the best trial ringed in gold. Failed and running trials have no AP to place.
function paramChart(box, name, dim, trials, metric, best) {
  const kind = Object.keys(dim)[0];
  const choices = kind === "choice" ? dim.choice.map(String) : null;
  const rows = trials.filter((t) => t.value != null && t.params[name] != null && ["succeeded", "pruned"].includes(t.status))
    .map((t) => ({ x: choices ? choices.indexOf(String(t.params[name])) : Number(t.params[name]), t }))
    .sort((a, b) => a.x - b.x || a.t.number - b.t.number);
  const div = document.createElement("div");
  div.className = "chart";
  div.dataset.param = name;
  box.appendChild(div);
  if (!rows.length) {
    div.innerHTML = `<div class="empty">${esc(name)}: the chart fills in as trials end</div>`;
    return { name, u: null, points: [] };
  }
  const pick = (keep) => rows.map((r) => (keep(r.t) ? r.t.value : null));
  // x: the whole searched range with a margin, so a point at either end is drawn whole and the chart shows
  // where in the range the trials fell; y: a margin below 0 for the same reason (no negative ticks).
  const x = { time: false, ...(kind === "log_uniform" ? { distr: 3, log: 10 } : {}) };
  if (choices) x.range = [-0.5, choices.length - 0.5];
  else {
    const [lo, hi] = dim[kind];
    x.range = kind === "log_uniform" ? [lo / 1.4, hi * 1.4] : [lo - 0.05 * (hi - lo || 1), hi + 0.05 * (hi - lo || 1)];
  }
  const y = { range: (_, lo, hi) => [Math.min(0, lo) - 0.06 * (hi - Math.min(0, lo) || 1), hi + 0.08 * (hi - Math.min(0, lo) || 1)] };
  const u = new uPlot({
    title: `${metric} vs ${name}`, width: Math.max(280, div.clientWidth - 16), height: 220,
    scales: { x, y },
    axes: [{ label: kind === "log_uniform" ? `${name} (log scale)` : name,
      values: choices ? (_, ticks) => ticks.map((t) => choices[t] ?? "") : (_, ticks) => ticks.map((t) => (t == null ? "" : fmtParam(t))),
      splits: choices ? () => choices.map((_, i) => i) : undefined, incrs: kind === "int" ? STEP_INCRS : undefined },
    { label: `${metric} (%)`, size: 50, values: (_, ticks) => ticks.map((t) => (t < 0 ? "" : fmtParam(t))) }],
    series: [{ label: name, value: (_, v) => (v == null ? "" : choices ? choices[v] ?? "" : fmtParam(v)) },
      { label: "finished", ...points(COLORS.succeeded, COLORS.succeeded, 9) },
      { label: "pruned (where it stopped)", ...points(COLORS.pruned, "#ffffff", 10, 2.5) },
      { label: "best", ...points(COLORS.best, "rgba(0,0,0,0)", 17, 2.5) }],
  }, [rows.map((r) => r.x), pick((t) => t.status === "succeeded"), pick((t) => t.status === "pruned"),
    pick((t) => t.number === best)], div);
  return { name, kind, u, points: rows.map((r) => ({ trial: r.t.number, status: r.t.status, x: r.x, value: r.t.value })) };
}

// Every trial's metric over its evaluations: the best trial's line thick and gold, the others thin (pruned
// ones dashed purple, ending where they stopped; failed red; finished and running grey).
function curvesChart(box, trials, metric, best) {
  const withEvals = trials.filter((t) => Object.keys(t.intermediate || {}).length);
  box.replaceChildren();
  if (!withEvals.length) {
    box.innerHTML = `<div class="empty">the curves fill in as the trials evaluate</div>`;
    return { u: null, lines: [] };
  }
  // The best last, so its line is drawn over the others.
  const ordered = [...withEvals.filter((t) => t.number !== best), ...withEvals.filter((t) => t.number === best)];
  const steps = [...new Set(ordered.flatMap((t) => Object.keys(t.intermediate).map(Number)))].sort((a, b) => a - b);
  const lines = ordered.map((t) => {
    const isBest = t.number === best;
    const color = isBest ? COLORS.best : t.status === "pruned" ? COLORS.pruned : t.status === "failed" ? COLORS.failed : COLORS.other;
    return { trial: t.number, job_id: t.job_id, status: t.status, best: isBest, color, width: isBest ? 3.5 : 1.25,
      dash: t.status === "pruned" ? [5, 4] : t.status === "running" ? [2, 3] : null,
      values: steps.map((s) => t.intermediate[s] ?? null) };
  });
  const u = new uPlot({
    title: `${metric} over evaluations: the best trial and the others`, width: Math.max(300, box.clientWidth - 16), height: 260,
    scales: { x: { time: false } },
    axes: [{ label: "step", incrs: STEP_INCRS }, { label: `${metric} (%)`, size: 50 }],
    series: [{ label: "step" }, ...lines.map((l) => ({
      label: `trial ${l.trial}${l.best ? " ★ best" : ` (${l.status})`}`, stroke: l.color, width: l.width, spanGaps: true,
      ...(l.dash ? { dash: l.dash } : {}), points: { show: true, size: l.best ? 7 : 4, stroke: l.color, fill: l.color },
    }))],
    legend: { live: true },
  }, [steps, ...lines.map((l) => l.values)], box);
  return { u, lines, steps };
}

export function sweepPanel(box, sweep) {
  box.innerHTML = `<h2>Trials <span class="muted" id="sw-state"></span></h2>
    <p id="sw-best" class="verdict" hidden></p>
    <div id="trials" class="muted">the sweep creates its trials when a worker starts it</div>
    <h2>${esc(sweep.spec.metric || "AP")} against each parameter</h2><div id="sw-charts" class="charts"></div>
    <h2>The best trial's curve beside the others</h2><div id="sw-curves" class="chart"></div>
    <p id="sw-compare"></p><p id="sw-report"></p>`;
  let charts = [];
  let curves = null;
  let drawn = ""; // the data the charts were drawn from: a poll that changes nothing redraws nothing
  let finalShown = false;

  function destroyCharts() {
    for (const c of charts) c.u?.destroy();
    curves?.u?.destroy();
  }

  async function refresh(job) {
    if (finalShown) return;
    const view = await api.get(`/jobs/${sweep.id}/trials`);
    const names = Object.keys(view.space);
    const metric = view.metric;
    const trials = view.trials;
    box.querySelector("#sw-state").textContent = `(${trials.length}/${view.budget}${isFinished(job) ? `, ${job.status}` : ""})`;
    if (trials.length) {
      box.querySelector("#trials").className = "";
      box.querySelector("#trials").innerHTML = `<table id="sw-trials"><thead><tr><th class="num">trial</th><th class="num">job</th>
        <th>status</th>${names.map((n) => `<th data-param="${esc(n)}">${esc(n)}</th>`).join("")}<th class="num">${esc(metric)}</th>
        <th class="num">steps</th><th>note</th></tr></thead><tbody>${trials.map((t) => `
        <tr data-trial="${t.number}" data-status="${esc(t.status)}" class="${t.number === view.best ? "best" : ""}">
        <td class="num">${t.number}${t.number === view.best ? ` <span class="best-mark" title="the best trial">★</span>` : ""}</td>
        <td class="num"><a href="#/jobs/${t.job_id}">${t.job_id}</a></td><td>${statusBadge(t.status)}</td>
        ${names.map((n) => `<td class="mono" data-param="${esc(n)}">${esc(t.params[n] == null ? "" : fmtParam(t.params[n]))}</td>`).join("")}
        <td class="num" data-value>${fmtNum(t.value, 2)}</td><td class="num">${t.steps ?? ""}</td>
        <td class="muted note">${["pruned", "failed"].includes(t.status) ? esc(t.reason) : ""}</td></tr>`).join("")}</tbody></table>`;
    }
    const best = trials.find((t) => t.number === view.best);
    const bestBox = box.querySelector("#sw-best");
    bestBox.hidden = !best;
    if (best) {
      bestBox.textContent = `${isFinished(job) ? "Best" : "Best so far"}: trial ${best.number} (job ${best.job_id}), ${names.map((n) => `${n}=${fmtParam(best.params[n])}`)
        .join(", ")}: ${metric} ${fmtNum(best.value, 2)}.`;
      const others = trials.filter((t) => t.job_id !== best.job_id && ["succeeded", "pruned"].includes(t.status)).map((t) => t.job_id);
      box.querySelector("#sw-compare").innerHTML = others.length
        ? `<a class="button" href="#/compare?ids=${[best.job_id, ...others].join(",")}&series=loss">Compare the best trial's curves with the others</a>`
        : "";
    }
    const key = JSON.stringify([view.best, trials.map((t) => [t.number, t.status, t.value, t.params, t.intermediate])]);
    if (key !== drawn) {
      drawn = key;
      destroyCharts();
      const chartBox = box.querySelector("#sw-charts");
      chartBox.replaceChildren();
      charts = names.map((n) => paramChart(chartBox, n, view.space[n], trials, metric, view.best));
      curves = curvesChart(box.querySelector("#sw-curves"), trials, metric, view.best);
    }
    window.icd.sweep = {
      best: view.best,
      status: job.status,
      trials: trials.map(({ number, status, value }) => ({ number, status, value })),
      charts: Object.fromEntries(charts.map((c) => [c.name, c])),
      curves,
      polls: (window.icd.sweep?.polls ?? 0) + 1,
    };
    if (isFinished(job)) {
      finalShown = true;
      if (job.status === "succeeded") {
        box.querySelector("#sw-report").innerHTML = `Report: <a href="/jobs/${sweep.id}/report">JSON</a> ·
          <a href="/jobs/${sweep.id}/report.md">markdown</a>`;
      }
    }
  }

  return { refresh, destroy: destroyCharts };
}
