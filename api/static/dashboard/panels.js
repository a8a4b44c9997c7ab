// Which panel a metric series goes on. One kind of series per panel keeps every line readable on its y
// axis. Losses are named (the total, the detector's terms, `loss_<method>...` for distillation);
// everything else a distiller reports is a diagnostic, so an unknown name can never land among the losses.

// torchvision's loss dict keys: RetinaNet / FCOS (classification, bbox_regression, bbox_ctrness) and
// Faster R-CNN (loss_classifier, loss_box_reg, loss_objectness, loss_rpn_box_reg).
export const DETECTOR_LOSSES = new Set(["loss", "classification", "bbox_regression", "bbox_ctrness",
  "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]);
const TIME = new Set(["sec_per_step", "data_time"]);
const MEMORY = new Set(["peak_memory_mb"]);
// Sizes of things (queries built, decoders trained): integers that would squash fractions to a line at 0.
const COUNT = /(^|_)(queries|decoders|count|num)(_|$)/;

const isDistillLoss = (name) => name.startsWith("loss_") && !DETECTOR_LOSSES.has(name);

/**
 * The panel of series `name`: losses | distill | lr | diagnostics | scales | counts | time | memory.
 * `names`: the run's other series; in a distillation run the total `loss` (detection + distillation
 * terms, often 10x the detector's) goes beside the distillation terms, so the detector's stay readable.
 * `points`: its first [[step, value], ...]; a diagnostic outside [0, 1] (an entropy, an error in pixels)
 * goes to its own panel, so the fractions (AUC, recall, attention mass) keep the whole y axis.
 */
export function panelOf(name, { names = [], points = [] } = {}) {
  if (name === "loss" && names.some(isDistillLoss)) return "distill";
  if (DETECTOR_LOSSES.has(name)) return "losses";
  if (isDistillLoss(name)) return "distill";
  if (name === "lr" || name.startsWith("lr_")) return "lr";
  if (TIME.has(name)) return "time";
  if (MEMORY.has(name)) return "memory";
  if (COUNT.test(name)) return "counts";
  return points.every(([, v]) => v == null || (v >= 0 && v <= 1)) ? "diagnostics" : "scales";
}

// Panel order on the page, their titles and y labels; `smooth` is the EMA weight a panel starts with
// (noisy per-step losses start smoothed, the rest raw).
export const PANELS = {
  losses: { title: "Detection losses", yLabel: "loss", smooth: 0.6 },
  distill: { title: "Distillation losses and the total", yLabel: "loss", smooth: 0.6 },
  ap: { title: "COCO AP over evaluations", yLabel: "AP (%)", points: true },
  lr: { title: "Learning rates", yLabel: "lr", log: true },
  diagnostics: { title: "Distiller diagnostics (fractions)", yLabel: "0 – 1" },
  scales: { title: "Distiller diagnostics (other scales)", yLabel: "value" },
  counts: { title: "Distiller counts", yLabel: "count" },
  time: { title: "Time per step", yLabel: "seconds" },
  memory: { title: "Peak memory", yLabel: "MiB" },
};
export const PANEL_ORDER = Object.keys(PANELS);
