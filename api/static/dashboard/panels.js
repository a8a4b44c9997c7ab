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

/** The panel of series `name`: losses | distill | lr | diagnostics | counts | time | memory. */
export function panelOf(name) {
  if (DETECTOR_LOSSES.has(name)) return "losses";
  if (name.startsWith("loss_")) return "distill";
  if (name === "lr" || name.startsWith("lr_")) return "lr";
  if (TIME.has(name)) return "time";
  if (MEMORY.has(name)) return "memory";
  return COUNT.test(name) ? "counts" : "diagnostics";
}

// Panel order on the page, their titles and y labels; `smooth` is the EMA weight a panel starts with
// (noisy per-step losses start smoothed, the rest raw).
export const PANELS = {
  losses: { title: "Total and detection losses", yLabel: "loss", smooth: 0.6 },
  distill: { title: "Distillation losses", yLabel: "loss", smooth: 0.6 },
  ap: { title: "COCO AP over evaluations", yLabel: "AP (%)", points: true },
  lr: { title: "Learning rates", yLabel: "lr", log: true },
  diagnostics: { title: "Distiller diagnostics", yLabel: "value" },
  counts: { title: "Distiller counts", yLabel: "count" },
  time: { title: "Time per step", yLabel: "seconds" },
  memory: { title: "Peak memory", yLabel: "MiB" },
};
export const PANEL_ORDER = Object.keys(PANELS);
