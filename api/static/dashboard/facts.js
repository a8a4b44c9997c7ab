// Head facts of a job page that need more than one field: how long the run took, and its final numbers.

import { CLOCK_NOTE } from "./clock.js";
import { esc, fmtDuration, fmtNum } from "./util.js";

// The job's headline numbers: AP first, then ICD's diagnostics that can say "not working" (AUC,
// in-box attention mass), never the accuracy at a threshold that sits at the fake-query share.
const SUMMARY_KEYS = ["AP", "AP50", "AP75", "icd_ident_auc", "icd_inbox_mass", "loss"];

/** The "final" fact: a run's headline metrics, a study's AP per method; "" when there is nothing to show. */
export function finalFact(job) {
  const m = job.final_metrics || {};
  let items = SUMMARY_KEYS.filter((k) => typeof m[k] === "number").slice(0, 5).map((k) => [k, m[k]]);
  if (job.kind === "study") {
    items = Object.entries(m).filter(([k, v]) => k.startsWith("AP_") && typeof v === "number")
      .map(([k, v]) => [`AP ${k.slice(3)}`, v]);
  }
  if (!items.length) return "";
  return `<div id="final-summary"><span>final</span>${items.map(([k, v]) => `${esc(k)} ${fmtNum(v, 2)}`).join(" · ")}</div>`;
}

/** Wall-clock duration (started → finished, or → now while it runs) and the training time of its steps. */
export function durationFact(job, trainingSeconds) {
  if (!job.started_at) return "";
  const start = new Date(job.started_at).getTime();
  const end = job.finished_at ? new Date(job.finished_at).getTime() : Date.now();
  const wall = fmtDuration(Math.max(0, (end - start) / 1000));
  const train = trainingSeconds ? ` · training ${fmtDuration(trainingSeconds)}` : "";
  return `<span>duration</span><span class="plain" title="${esc(CLOCK_NOTE)}">${wall}${job.finished_at ? "" : " so far"}${train}</span>`;
}
