// The compare view (#/compare?ids=3,5&series=loss): two or more jobs' curves overlaid, one metric series
// and the AP over evaluations, each line labeled by job.

import { api } from "./api.js";
import { apSeries, LineChart } from "./charts.js";
import { esc, statusBadge } from "./util.js";

export function compareView(main, params) {
  const ids = (params.get("ids") || "").split(",").map(Number).filter((n) => n > 0);
  const seriesName = params.get("series") || "loss";
  const charts = [];
  let stopped = false;

  main.innerHTML = `
    <h1>Compare jobs</h1>
    <div class="two">
      <div><h2>Jobs</h2><div class="picker" id="picker"><span class="muted">Loading…</span></div></div>
      <div><h2>Series</h2><select id="series"></select>
        <p><button class="primary" id="apply">Show</button></p><p class="muted" id="hint"></p></div>
    </div>
    <h2>Curves</h2><div class="charts" id="cmp-charts"></div>`;
  const $ = (sel) => main.querySelector(sel);

  const go = () => {
    const picked = [...main.querySelectorAll("[data-pick]:checked")].map((b) => b.dataset.pick);
    location.hash = `#/compare?ids=${picked.join(",")}&series=${encodeURIComponent($("#series").value)}`;
  };
  $("#apply").onclick = go;

  async function load() {
    const recent = (await api.get("/jobs?limit=100")).items.filter((j) => j.kind !== "study");
    const known = new Set(recent.map((j) => j.id));
    const extra = await Promise.all(ids.filter((id) => !known.has(id)).map((id) => api.get(`/jobs/${id}`).catch(() => null)));
    const jobs = [...extra.filter(Boolean), ...recent];
    if (stopped) return;
    $("#picker").innerHTML = jobs.map((j) => `<label><input type="checkbox" data-pick="${j.id}" ${ids.includes(j.id) ? "checked" : ""}>
      #${j.id} ${esc(j.name)} <span class="muted">${esc(j.kind)}</span> ${statusBadge(j.status)}</label>`).join("") ||
      `<span class="muted">no jobs yet</span>`;
    if (ids.length < 2) $("#hint").textContent = "Pick two or more jobs.";
    const byId = new Map(jobs.map((j) => [j.id, j]));
    const results = await Promise.all(ids.map(async (id) => ({
      id,
      metrics: await api.get(`/jobs/${id}/metrics?names=${encodeURIComponent(seriesName)}&max_points=1000`),
      evals: await api.get(`/jobs/${id}/evaluations`),
      names: Object.keys((await api.get(`/jobs/${id}/metrics?max_points=2&since_step=0`)).series),
    })));
    if (stopped) return;
    const allNames = [...new Set(["loss", ...results.flatMap((r) => r.names)])].sort();
    $("#series").innerHTML = allNames.map((n) => `<option ${n === seriesName ? "selected" : ""}>${esc(n)}</option>`).join("");
    if (!ids.length) return;
    const label = (id) => `#${id} ${byId.get(id)?.name ?? ""}`;
    const box1 = document.createElement("div");
    box1.className = "chart";
    const box2 = document.createElement("div");
    box2.className = "chart";
    $("#cmp-charts").replaceChildren(box1, box2);
    const c1 = new LineChart(box1, "compare-series", { title: `${seriesName} by job`, yLabel: seriesName });
    const c2 = new LineChart(box2, "compare-ap", { title: "AP over evaluations by job", yLabel: "AP (%)", points: true });
    charts.push(c1, c2);
    c1.append(Object.fromEntries(results.map((r) => [label(r.id), r.metrics.series[seriesName] || []])));
    c2.append(Object.fromEntries(results.map((r) => [label(r.id), apSeries(r.evals, ["ap"]).AP || []])));
  }
  load().catch((err) => { $("#hint").textContent = err.message; });
  return () => { stopped = true; charts.forEach((c) => c.destroy()); };
}
