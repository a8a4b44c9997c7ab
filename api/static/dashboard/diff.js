// What differs between jobs: their specs as dotted paths (only the fields that differ) and their final
// metrics, as one table each with a column per job.

import { esc, fmtNum } from "./util.js";

/** {"distill.method": "icd", "student.levels": "[\"p3\",\"p4\"]", ...}; a list of plain values is one field. */
export function flatten(value, prefix = "", out = {}) {
  const plainList = Array.isArray(value) && value.every((v) => v === null || typeof v !== "object");
  if (value !== null && typeof value === "object" && !plainList) {
    const entries = Array.isArray(value) ? value.map((v, i) => [String(i), v]) : Object.entries(value);
    if (!entries.length) out[prefix] = JSON.stringify(value);
    for (const [k, v] of entries) flatten(v, prefix ? `${prefix}.${k}` : k, out);
  } else if (prefix) {
    out[prefix] = typeof value === "string" ? value : JSON.stringify(value);
  }
  return out;
}

/** Paths whose value is not the same in every object (a path missing from one counts as different). */
export function differingPaths(flats) {
  const paths = [...new Set(flats.flatMap((f) => Object.keys(f)))].sort();
  return paths.filter((p) => new Set(flats.map((f) => (p in f ? f[p] : undefined))).size > 1);
}

// The metrics a reader looks for first; the rest of final_metrics follows in name order.
const KEY_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "loss", "icd_ident_auc", "icd_real_recall",
  "icd_inbox_mass", "icd_loc_error"];
const HIGHER_IS_BETTER = /^AP/;

function metricOrder(a, b) {
  const ia = KEY_METRICS.indexOf(a);
  const ib = KEY_METRICS.indexOf(b);
  if (ia >= 0 || ib >= 0) return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib);
  return a.localeCompare(b);
}

function fmtMetric(v) {
  if (v == null) return `<span class="muted">–</span>`;
  if (typeof v !== "number") return esc(v);
  return Math.abs(v) >= 1000 ? fmtNum(v, 0) : String(Number(v.toPrecision(4)));
}

function table(id, heads, rows, empty) {
  if (!rows.length) return `<p class="muted" id="${id}">${empty}</p>`;
  return `<div class="scroll-x"><table id="${id}" class="diff"><thead><tr><th>field</th>${heads}</tr></thead>
    <tbody>${rows.join("")}</tbody></table></div>`;
}

/** The two tables for jobs (each with spec and final_metrics); the job's own name is in its column head. */
export function diffTables(jobs) {
  const heads = jobs.map((j) => `<th><a href="#/jobs/${j.id}">#${j.id}</a> ${esc(j.name)}</th>`).join("");
  const flats = jobs.map((j) => {
    const f = flatten(j.spec || {});
    delete f.name;
    return f;
  });
  const specRows = differingPaths(flats).map((p) => `<tr data-path="${esc(p)}"><td class="mono">${esc(p)}</td>${flats
    .map((f) => `<td class="mono">${p in f ? esc(f[p]) : `<span class="muted">(unset)</span>`}</td>`).join("")}</tr>`);
  const metrics = jobs.map((j) => j.final_metrics || {});
  const names = differingPaths(metrics.map((m) => Object.fromEntries(Object.entries(m).map(([k, v]) => [k, JSON.stringify(v)]))))
    .sort(metricOrder);
  const metricRows = names.map((k) => {
    const values = metrics.map((m) => m[k]);
    const numbers = values.filter((v) => typeof v === "number");
    const best = HIGHER_IS_BETTER.test(k) && numbers.length > 1 ? Math.max(...numbers) : null;
    return `<tr data-metric="${esc(k)}"><td class="mono">${esc(k)}</td>${values.map((v) =>
      `<td class="num${v === best ? " best" : ""}">${fmtMetric(v)}</td>`).join("")}</tr>`;
  });
  return `<h2>Spec differences</h2>${table("spec-diff", heads, specRows, "The specs are the same (apart from the name).")}
    <h2>Final metric differences</h2>${table("metric-diff", heads, metricRows, "No final metrics differ (or none are recorded yet).")}`;
}
