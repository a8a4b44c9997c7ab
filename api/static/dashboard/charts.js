// Line charts of step-indexed series on uPlot (vendored): axes, legends, incremental appends.

const PALETTE = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00", "#0a7ea4", "#bf3989", "#4d2d00", "#57606a",
  "#116329", "#953800", "#6639ba"];

/** A y tick: 3 significant digits, exponent notation for very small or large values (lr 1e-4, loss 1e6). */
function tickLabel(v) {
  if (v == null) return "";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a < 1e-3 || a >= 1e6) return v.toExponential(1);
  return a >= 100 ? String(Math.round(v)) : String(Number(v.toPrecision(3)));
}

/** Registry the browser tests and the benchmark read: chart id → LineChart. */
window.icd = window.icd || {};
window.icd.charts = window.icd.charts || {};

export class LineChart {
  /**
   * @param {HTMLElement} box  container; the chart fills its width
   * @param {string} id        registry key (window.icd.charts[id])
   * @param {{title: string, yLabel: string, xLabel?: string, points?: boolean, height?: number}} opts
   */
  constructor(box, id, opts) {
    this.box = box;
    this.id = id;
    this.opts = opts;
    this.series = new Map(); // name -> {xs: number[], ys: number[]}
    this.u = null;
    this.names = [];
    box.innerHTML = `<h3>${opts.title}</h3><div class="plot"><div class="empty">no points yet</div></div>`;
    this.plotBox = box.querySelector(".plot");
    window.icd.charts[id] = this;
  }

  /** Add [[step, value], ...] per series name; points at or before a series' last step replace old ones. */
  append(byName) {
    let changed = false;
    for (const [name, points] of Object.entries(byName)) {
      if (!points.length) continue;
      let s = this.series.get(name);
      if (!s) { s = { xs: [], ys: [] }; this.series.set(name, s); }
      const last = s.xs.length ? s.xs[s.xs.length - 1] : -Infinity;
      if (points[0][0] > last) {
        for (const [x, y] of points) { s.xs.push(x); s.ys.push(y); }
      } else {
        const merged = new Map(s.xs.map((x, i) => [x, s.ys[i]]));
        for (const [x, y] of points) merged.set(x, y);
        const xs = [...merged.keys()].sort((a, b) => a - b);
        s.xs = xs;
        s.ys = xs.map((x) => merged.get(x));
      }
      changed = true;
    }
    if (changed) this.render();
  }

  /** Points held per series (what the tests check: read from the chart's data, not the DOM). */
  pointCount() {
    return Object.fromEntries([...this.series].map(([n, s]) => [n, s.xs.length]));
  }

  aligned() {
    const names = [...this.series.keys()].sort();
    const all = names.map((n) => this.series.get(n));
    const first = all[0].xs;
    const same = all.every((s) => s.xs.length === first.length && s.xs[s.xs.length - 1] === first[first.length - 1]);
    if (same) return { names, data: [first, ...all.map((s) => s.ys)] };
    const xs = [...new Set(all.flatMap((s) => s.xs))].sort((a, b) => a - b);
    const data = [xs];
    for (const s of all) {
      const ys = new Array(xs.length).fill(null);
      let j = 0;
      for (let i = 0; i < xs.length && j < s.xs.length; i++) if (xs[i] === s.xs[j]) ys[i] = s.ys[j++];
      data.push(ys);
    }
    return { names, data };
  }

  render() {
    const { names, data } = this.aligned();
    if (this.u && names.join("\n") === this.names.join("\n")) {
      this.u.setData(data);
      return;
    }
    this.names = names;
    if (this.u) this.u.destroy();
    this.plotBox.innerHTML = "";
    const width = Math.max(320, this.box.clientWidth - 16);
    const o = this.opts;
    this.u = new uPlot({
      width, height: o.height || 240,
      scales: { x: { time: false } },
      axes: [{ label: o.xLabel || "step" }, { label: o.yLabel, size: 64, values: (_, ticks) => ticks.map(tickLabel) }],
      series: [{ label: o.xLabel || "step" }, ...names.map((n, i) => ({
        label: n, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true,
        points: { show: o.points ?? false, size: 6 },
      }))],
      legend: { live: true },
    }, data, this.plotBox);
    window.icd.firstChartMs ??= performance.now(); // ms since navigation: read by benchmarks/dashboard_perf.py
  }

  resize() {
    if (this.u) this.u.setSize({ width: Math.max(320, this.box.clientWidth - 16), height: this.opts.height || 240 });
  }

  destroy() {
    if (this.u) this.u.destroy();
    if (window.icd.charts[this.id] === this) delete window.icd.charts[this.id];
  }
}

const DIAGNOSTIC = /acc|fraction|frac|total|norm|ratio|entropy|count|kept|pct|grad|cos|sim/;

/** Which chart a metric series goes on: one y scale per chart keeps every line readable. The trainer logs the
 * detector's and the distiller's loss terms under their own names (classification, loss_box_reg, icd, ...),
 * so anything that is not lr, time, memory or a distiller statistic is a loss term. */
export function chartGroup(name) {
  if (name === "lr" || name.startsWith("lr")) return "lr";
  if (name === "sec_per_step" || name === "data_time") return "speed";
  if (name === "peak_memory_mb") return "memory";
  if (name.includes("loss")) return "losses";
  return DIAGNOSTIC.test(name) ? "diagnostics" : "losses";
}

export const CHART_GROUPS = {
  losses: { title: "Losses", yLabel: "loss" },
  lr: { title: "Learning rate", yLabel: "lr" },
  speed: { title: "Time per step", yLabel: "seconds" },
  memory: { title: "Peak memory", yLabel: "MiB" },
  diagnostics: { title: "Distiller diagnostics", yLabel: "value" },
  ap: { title: "COCO AP over evaluations", yLabel: "AP (%)", points: true },
};

export const AP_KEYS = ["ap", "ap50", "ap75", "aps", "apm", "apl"];
export const AP_LABELS = { ap: "AP", ap50: "AP50", ap75: "AP75", aps: "APs", apm: "APm", apl: "APl" };

/** Evaluations → {AP: [[step, v]], ...} for a LineChart. */
export function apSeries(evaluations, keys = AP_KEYS) {
  const out = {};
  for (const k of keys) {
    const pts = evaluations.filter((e) => e[k] != null).map((e) => [e.step, e[k]]);
    if (pts.length) out[AP_LABELS[k]] = pts;
  }
  return out;
}
