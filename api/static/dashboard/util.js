// Small helpers shared by the views: escaping, formatting, flash messages.

export const TERMINAL = ["succeeded", "failed", "canceled", "pruned"]; // pruned: a sweep's trial (docs/sweeps.md)
export const isFinished = (job) => TERMINAL.includes(job.status);

export function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

export function fmtDuration(s) {
  if (s == null || !isFinite(s)) return "";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

export const fmtNum = (v, digits = 1) => (v == null || !isFinite(v) ? "" : Number(v).toFixed(digits));
export const fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "");

export function fmtBytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

/** The AP a job is known by: its final AP, or a study's best method mean. */
export function headlineAp(job) {
  const m = job.final_metrics || {};
  if (m.AP != null) return m.AP;
  const study = Object.entries(m).filter(([k, v]) => k.startsWith("AP_") && v != null).map(([, v]) => v);
  return study.length ? Math.max(...study) : null;
}

export function statusBadge(status) {
  return `<span class="status ${esc(status)}" data-status="${esc(status)}">${esc(status)}</span>`;
}

export function progressBar(job, big = false) {
  const pct = job.percent ?? (job.progress_total ? (100 * job.progress_step) / job.progress_total : 0);
  const label = job.progress_total ? `${job.progress_step}/${job.progress_total}` : "";
  return `<span class="bar${big ? " big" : ""}" title="${esc(label)}"><div style="width:${Math.min(100, pct || 0)}%"></div></span>
    <span class="mono">${pct == null ? "" : pct.toFixed(0) + " %"}</span>`;
}

export function flash(message, kind = "err") {
  const box = document.getElementById("flash");
  const div = document.createElement("div");
  div.className = kind;
  div.textContent = message;
  box.replaceChildren(div);
  if (kind === "ok") setTimeout(() => div.remove(), 4000);
}
