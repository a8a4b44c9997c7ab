// The compare view (#/compare?ids=3,5&series=loss): what differs between two or more jobs (spec fields and
// final metrics) and their curves overlaid, each line labeled by job: the AP over evaluations, and one
// metric series, by default the detection loss (the sum of the detector's terms). The total `loss` is no
// default: it includes each method's own distillation term, so the run without one would look best.

import { api } from "./api.js";
import { apSeries, LineChart } from "./charts.js";
import { diffTables } from "./diff.js";
import { DETECTOR_LOSSES } from "./panels.js";
import { esc, statusBadge } from "./util.js";

const DETECTION = "detection loss";
const TERMS = [...DETECTOR_LOSSES].filter((n) => n !== "loss");

/** {step: sum of the detector's loss terms logged at that step} as [[step, value], ...]. */
function detectionLoss(series) {
  const sums = new Map();
  for (const name of TERMS) for (const [x, y] of series[name] || []) sums.set(x, (sums.get(x) ?? 0) + y);
  return [...sums].sort((a, b) => a[0] - b[0]);
}

async function seriesOf(id, name) {
  const names = name === DETECTION ? TERMS.join(",") : name;
  const m = await api.get(`/jobs/${id}/metrics?names=${encodeURIComponent(names)}&max_points=1000`);
  return name === DETECTION ? detectionLoss(m.series) : m.series[name] || [];
}

export function compareView(main, params) {
  const ids = (params.get("ids") || "").split(",").map(Number).filter((n) => n > 0);
  const seriesName = params.get("series") || DETECTION;
  const charts = [];
  let stopped = false;

  main.innerHTML = `
    <h1>Compare jobs</h1>
    <div class="two">
      <div><h2>Jobs</h2><div class="picker" id="picker"><span class="muted">Loading…</span></div></div>
      <div><h2>Series</h2><select id="series"></select>
        <p><button class="primary" id="apply">Show</button></p><p class="muted" id="hint"></p></div>
    </div>
    <div id="diff"></div>
    <h2>Curves</h2><div class="charts" id="cmp-charts"></div>`;
  const $ = (sel) => main.querySelector(sel);

  const go = () => {
    const picked = [...main.querySelectorAll("[data-pick]:checked")].map((b) => b.dataset.pick);
    location.hash = `#/compare?ids=${picked.join(",")}&series=${encodeURIComponent($("#series").value)}`;
  };
  $("#apply").onclick = go;

  async function load() {
    const recent = (await api.get("/jobs?limit=100")).items.filter((j) => j.kind !== "study");
    const details = await Promise.all(ids.map((id) => api.get(`/jobs/${id}`).catch(() => null)));
    const known = new Set(recent.map((j) => j.id));
    const jobs = [...details.filter((j) => j && !known.has(j.id)), ...recent];
    if (stopped) return;
    $("#picker").innerHTML = jobs.map((j) => `<label><input type="checkbox" data-pick="${j.id}" ${ids.includes(j.id) ? "checked" : ""}>
      #${j.id} ${esc(j.name)} <span class="muted">${esc(j.kind)}</span> ${statusBadge(j.status)}</label>`).join("") ||
      `<span class="muted">no jobs yet</span>`;
    if (ids.length < 2) $("#hint").textContent = "Pick two or more jobs.";
    const compared = details.filter(Boolean);
    if (compared.length > 1) $("#diff").innerHTML = diffTables(compared);
    const byId = new Map(jobs.map((j) => [j.id, j]));
    const results = await Promise.all(ids.map(async (id) => ({
      id,
      points: await seriesOf(id, seriesName),
      evals: await api.get(`/jobs/${id}/evaluations`),
      names: Object.keys((await api.get(`/jobs/${id}/metrics?max_points=2&since_step=0`)).series),
    })));
    if (stopped) return;
    const allNames = [DETECTION, ...[...new Set(["loss", ...results.flatMap((r) => r.names)])].sort()];
    $("#series").innerHTML = allNames.map((n) => `<option ${n === seriesName ? "selected" : ""}>${esc(n)}</option>`).join("");
    $("#series").title = `${DETECTION}: the sum of the detector's own terms (${TERMS.join(", ")}), whichever the runs log`;
    if (!ids.length) return;
    const label = (id) => `#${id} ${byId.get(id)?.name ?? ""}`;
    const box1 = document.createElement("div");
    box1.className = "chart";
    const box2 = document.createElement("div");
    box2.className = "chart";
    $("#cmp-charts").replaceChildren(box2, box1);
    const c1 = new LineChart(box1, "compare-series", { title: `${seriesName} by job`, yLabel: seriesName, smooth: 0.6 });
    const c2 = new LineChart(box2, "compare-ap", { title: "AP over evaluations by job", yLabel: "AP (%)", points: true });
    charts.push(c1, c2);
    c1.append(Object.fromEntries(results.map((r) => [label(r.id), r.points])));
    c2.append(Object.fromEntries(results.map((r) => [label(r.id), apSeries(r.evals, ["ap"]).AP || []])));
    window.icd.compare = { ids, series: seriesName, diffPaths: [...main.querySelectorAll("#spec-diff [data-path]")].map((r) => r.dataset.path) };
  }
  load().catch((err) => { $("#hint").textContent = err.message; });
  return () => { stopped = true; charts.forEach((c) => c.destroy()); };
}
