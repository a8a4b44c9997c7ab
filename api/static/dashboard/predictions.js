// A finished train/distill job's deployment facts: its detections drawn on the first validation images
// (the teacher's beside the student's for a distill job) and what the model costs to run.

import { api } from "./api.js";
import { esc, fmtNum } from "./util.js";

function costLine(label, c) {
  if (!c) return "";
  const ms = [["eager", c.latency_ms], ["TorchScript", c.latency_ms_torchscript], ["ONNX Runtime", c.latency_ms_onnxruntime]]
    .filter(([, v]) => v != null).map(([k, v]) => `${k} ${fmtNum(v, 1)} ms`).join(" · ");
  return `<div data-cost="${esc(label)}"><span>${esc(label)}</span>${fmtNum(c.params_m, 2)} M params · ${fmtNum(c.gflops, 2)} GFLOPs
    · ${fmtNum(c.peak_inference_mb, 0)} MB · ${ms}</div>`;
}

/** Fill `box` with the job's cost and its rendered predictions; empty (a note) before the job renders them. */
export async function predictionsPanel(box, job) {
  const preds = await api.get(`/jobs/${job.id}/predictions`);
  const cost = job.model_cost || {};
  const teacherBy = new Map(preds.teacher.map((p) => [p.name, p]));
  const img = (p, who) => (p ? `<figure><img src="${esc(p.url)}" alt="${esc(who)} ${esc(p.name)}" loading="lazy">
    <figcaption>${esc(who)} · ${esc(p.name)}</figcaption></figure>` : "<figure></figure>");
  const pairs = preds.model.map((p) => `<div class="pred-row">${img(p, preds.teacher.length ? "student" : "model")}
    ${preds.teacher.length ? img(teacherBy.get(p.name), "teacher") : ""}</div>`).join("");
  box.innerHTML = `<h2>Model cost and predictions</h2>
    <div class="facts">${costLine(preds.teacher.length ? "student" : "model", cost.model)}${costLine("teacher", cost.teacher)}</div>
    ${pairs ? `<div class="preds">${pairs}</div>` : `<p class="muted">no predictions rendered (deploy.prediction_images: 0)</p>`}
    ${preds.detections_url ? `<p><a href="${esc(preds.detections_url)}">detections (COCO JSON)</a></p>` : ""}`;
  window.icd = window.icd || {};
  window.icd.predictions = { jobId: job.id, images: preds.model.length, teacher: preds.teacher.length };
}
