// A prediction image opened large: the raw image on a canvas with the run's detections drawn over it,
// and a toggle per class to show or hide its boxes. Runs that kept no raw image (older ones) show their
// PNG with the boxes burned in, without toggles.

import { esc } from "./util.js";

// The colors icd_core/predict.py draws its PNGs with, by label index, so both views agree.
export const CLASS_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
  "#fabed4", "#469990", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075", "#ffd8b1"];
const MAX_SIDE = 720;

/**
 * Detections of one image from a COCO detections file: [{cls, label, score, box: [x, y, w, h]}] at or above
 * its drawing threshold (`info.drawn_score_min`, else 0.3), best first.
 */
export function imageDetections(coco, pngName) {
  const scoreMin = coco?.info?.drawn_score_min ?? 0.3;
  const stem = pngName.replace(/\.png$/, "");
  const image = coco?.images.find((i) => i.file_name.replace(/\.[^.]+$/, "") === stem);
  if (!image) return { scoreMin, boxes: [] };
  const index = new Map(coco.categories.map((c, i) => [c.id, { cls: c.name, label: i }]));
  const boxes = coco.annotations.filter((a) => a.image_id === image.id && a.score >= scoreMin)
    .map((a) => ({ ...index.get(a.category_id), score: a.score, box: a.bbox })).sort((a, b) => b.score - a.score);
  return { scoreMin, boxes };
}

function dialog() {
  let d = document.getElementById("lightbox");
  if (!d) {
    d = document.createElement("dialog");
    d.id = "lightbox";
    d.addEventListener("click", (e) => { if (e.target === d) d.close(); }); // a click on the backdrop
    d.addEventListener("close", () => { window.icd.lightbox = { open: false }; });
    document.body.append(d);
  }
  return d;
}

/** Open `title`'s image: {title, url, rawUrl, boxes, scoreMin} (boxes from imageDetections). */
export function openLightbox({ title, url, rawUrl, boxes, scoreMin }) {
  const d = dialog();
  const classes = [...new Map(boxes.map((b) => [b.cls, b.label])).entries()];
  const shown = new Set(classes.map(([c]) => c));
  let floor = scoreMin; // raised with the slider: a weak model's many low boxes hide the good ones
  const toggles = rawUrl && classes.length ? classes.map(([c, label]) => {
    const n = boxes.filter((b) => b.cls === c).length;
    return `<label class="cls-toggle"><input type="checkbox" data-class="${esc(c)}" checked>
      <i style="background:${CLASS_COLORS[label % CLASS_COLORS.length]}"></i>${esc(c)} <span class="muted">${n}</span></label>`;
  }).join("") : "";
  const note = !boxes.length ? `no detection ≥ ${scoreMin.toFixed(2)}`
    : rawUrl ? `${boxes.length} detection${boxes.length === 1 ? "" : "s"} ≥ ${scoreMin.toFixed(2)}`
      : "boxes are drawn into this image (the run kept no raw image): no class toggles";
  const slider = rawUrl && boxes.length ? `<label class="lb-score">min score <input type="range" data-score
    min="${scoreMin}" max="1" step="0.05" value="${scoreMin}"> <output>${scoreMin.toFixed(2)}</output></label>` : "";
  d.innerHTML = `<div class="lb-head"><b>${esc(title)}</b><span class="muted" id="lb-note">${note}</span>
    <button id="lb-close" aria-label="close">✕</button></div><div class="lb-classes">${toggles}${slider}</div>
    <canvas id="lb-canvas"></canvas>`;
  d.querySelector("#lb-close").onclick = () => d.close();
  const canvas = d.querySelector("#lb-canvas");
  const img = new Image();
  const draw = () => {
    const drawn = paint(canvas, img, rawUrl ? boxes.filter((b) => shown.has(b.cls) && b.score >= floor) : []);
    window.icd.lightbox = { open: d.open, title, classes: Object.fromEntries(classes.map(([c]) => [c, shown.has(c)])),
      drawn, total: boxes.length, raw: !!rawUrl };
  };
  for (const box of d.querySelectorAll("[data-class]")) {
    box.onchange = () => {
      box.checked ? shown.add(box.dataset.class) : shown.delete(box.dataset.class);
      draw();
    };
  }
  const score = d.querySelector("[data-score]");
  if (score) {
    score.oninput = () => {
      floor = Number(score.value);
      score.nextElementSibling.textContent = floor.toFixed(2);
      draw();
    };
  }
  img.onload = draw;
  img.src = rawUrl || url;
  d.showModal();
}

/** The image scaled up to fit (pixels kept sharp: tiny validation images stay legible), then the boxes. */
function paint(canvas, img, boxes) {
  const fit = Math.min(MAX_SIDE, window.innerWidth - 48, window.innerHeight - 160) / Math.max(img.width, img.height);
  const scale = fit >= 1 ? Math.floor(fit) : fit;
  canvas.width = Math.round(img.width * scale);
  canvas.height = Math.round(img.height * scale);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = scale < 1;
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.font = "13px system-ui, sans-serif";
  ctx.textBaseline = "top";
  for (const b of [...boxes].reverse()) { // best last, drawn on top
    const [x, y, w, h] = b.box.map((v) => v * scale);
    const color = CLASS_COLORS[b.label % CLASS_COLORS.length];
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.strokeRect(x, y, w, h);
    const text = `${b.cls} ${b.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 6;
    const ty = y >= 17 ? y - 17 : y;
    ctx.fillStyle = color;
    ctx.fillRect(x, ty, tw, 17);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x + 3, ty + 2);
  }
  return boxes.length;
}
