// A finished train/distill job's deployment facts: its detections drawn on the first validation images
// (the teacher's beside the student's for a distill job) and what the model costs to run. A thumbnail
// opens large (lightbox.js), and one with no box above the drawing threshold says so.

import { api } from "./api.js";
import { imageDetections, openLightbox } from "./lightbox.js";
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
  const [coco, teacherCoco] = await Promise.all([preds.detections_url, preds.teacher_detections_url]
    .map((u) => (u ? api.get(u).catch(() => null) : null)));
  const cost = job.model_cost || {};
  const teacherBy = new Map(preds.teacher.map((p) => [p.name, p]));
  const items = [];
  const img = (p, who, source) => {
    if (!p) return "<figure></figure>";
    const { boxes, scoreMin } = imageDetections(source, p.name);
    const i = items.push({ title: `${who} · ${p.name}`, url: p.url, rawUrl: p.raw_url, boxes, scoreMin }) - 1;
    const none = source && !boxes.length ? `<span class="no-det">no detection ≥ ${scoreMin.toFixed(2)}</span>` : "";
    return `<figure><button class="thumb" data-open="${i}" title="open large"><img src="${esc(p.url)}"
      alt="${esc(who)} ${esc(p.name)}" loading="lazy"></button><figcaption>${esc(who)} · ${esc(p.name)} ${none}</figcaption></figure>`;
  };
  const pairs = preds.model.map((p) => `<div class="pred-row">${img(p, preds.teacher.length ? "student" : "model", coco)}
    ${preds.teacher.length ? img(teacherBy.get(p.name), "teacher", teacherCoco) : ""}</div>`).join("");
  box.innerHTML = `<h2>Model cost and predictions</h2>
    <div class="facts">${costLine(preds.teacher.length ? "student" : "model", cost.model)}${costLine("teacher", cost.teacher)}</div>
    ${pairs ? `<div class="preds">${pairs}</div>` : `<p class="muted">no predictions rendered (deploy.prediction_images: 0)</p>`}
    ${preds.detections_url ? `<p><a href="${esc(preds.detections_url)}">detections (COCO JSON)</a></p>` : ""}`;
  for (const b of box.querySelectorAll("[data-open]")) b.onclick = () => openLightbox(items[Number(b.dataset.open)]);
  window.icd = window.icd || {};
  window.icd.predictions = { jobId: job.id, images: preds.model.length, teacher: preds.teacher.length,
    empty: items.filter((it) => !it.boxes.length).length };
}
