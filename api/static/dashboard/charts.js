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

export const STEP_INCRS = [1, 2, 5].flatMap((m) => [1, 10, 100, 1e3, 1e4, 1e5, 1e6].map((e) => m * e)).sort((a, b) => a - b);

/** Registry the browser tests and the benchmark read: chart id → LineChart. */
window.icd = window.icd || {};
window.icd.charts = window.icd.charts || {};

export class LineChart {
  /**
   * @param {HTMLElement} box  container; the chart fills its width
   * @param {string} id        registry key (window.icd.charts[id])
   * @param {{title: string, yLabel: string, xLabel?: string, points?: boolean, height?: number,
   *          log?: boolean, smooth?: number, controls?: boolean}} opts
   *   log: start on a log y scale; smooth: the EMA weight it starts with (0: raw); controls: show the
   *   log toggle and the smoothing slider (default true)
   */
  constructor(box, id, opts) {
    this.box = box;
    this.id = id;
    this.opts = opts;
    this.series = new Map(); // name -> {xs: number[], ys: number[]}  (x: the step, always)
    this.u = null;
    this.shape = "";
    this.log = !!opts.log;
    this.smooth = opts.smooth ?? 0;
    this.xAxis = { label: opts.xLabel || "step", map: null, fmt: null }; // map: step -> x shown
    box.innerHTML = `<div class="chart-head"><h3>${opts.title}</h3>${opts.controls === false ? "" : chartControls(this)}</div>
      <div class="plot"><div class="empty">no points yet</div></div>`;
    this.plotBox = box.querySelector(".plot");
    this.bindControls();
    window.icd.charts[id] = this;
  }

  bindControls() {
    const log = this.box.querySelector("[data-log]");
    const smooth = this.box.querySelector("[data-smooth]");
    if (log) log.onchange = () => this.setLog(log.checked);
    if (smooth) smooth.oninput = () => this.setSmoothing(Number(smooth.value));
  }

  /** Log y scale on or off (values <= 0 have no place on it and are left out). */
  setLog(on) {
    this.log = !!on;
    const box = this.box.querySelector("[data-log]");
    if (box) box.checked = this.log;
    if (this.series.size) this.render();
  }

  /** EMA weight in [0, 0.99]: 0 draws the raw line only; above, the smoothed line over a faint raw one. */
  setSmoothing(w) {
    this.smooth = Math.min(0.99, Math.max(0, Number(w) || 0));
    const out = this.box.querySelector("[data-smooth-value]");
    if (out) out.textContent = this.smooth.toFixed(2);
    if (this.series.size) this.render();
  }

  /** What the x axis shows: `map(step)` (null: the step itself), its label and a tick formatter. */
  setXAxis(label, map = null, fmt = null) {
    this.xAxis = { label, map, fmt };
    if (this.series.size) this.render();
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

  /** uPlot's data: x mapped, y cleaned for the log scale, and per name [raw, smoothed] when smoothing. */
  plotData() {
    const { names, data } = this.aligned();
    const xs = this.xAxis.map ? data[0].map(this.xAxis.map) : data[0];
    const clean = (ys) => (this.log ? ys.map((v) => (v != null && v > 0 ? v : null)) : ys);
    const out = [xs];
    const lines = [];
    names.forEach((n, i) => {
      const ys = clean(data[i + 1]);
      if (this.smooth > 0) {
        out.push(ys, ema(ys, this.smooth));
        lines.push({ name: n, raw: true, color: i }, { name: n, raw: false, color: i });
      } else {
        out.push(ys);
        lines.push({ name: n, raw: false, color: i });
      }
    });
    return { lines, data: out };
  }

  render() {
    const { lines, data } = this.plotData();
    const shape = JSON.stringify([lines, this.log, this.xAxis.label]);
    if (this.u && shape === this.shape) {
      this.u.setData(data);
      return;
    }
    this.shape = shape;
    if (this.u) this.u.destroy();
    this.plotBox.innerHTML = "";
    const o = this.opts;
    const xFmt = this.xAxis.fmt;
    const smoothed = this.smooth > 0;
    this.u = new uPlot({
      width: this.width(), height: o.height || 240,
      scales: { x: { time: false }, y: this.log ? { distr: 3, log: 10 } : {} },
      axes: [
        // Steps are whole numbers: no 2.5 ticks when a run has logged only a few.
        { label: this.xAxis.label, values: xFmt ? (_, ticks) => ticks.map(xFmt) : undefined,
          incrs: this.xAxis.map ? undefined : STEP_INCRS },
        { label: o.yLabel, size: 64, values: (_, ticks) => ticks.map(tickLabel) },
      ],
      series: [{ label: this.xAxis.label, value: xFmt ? (_, v) => (v == null ? "" : xFmt(v)) : undefined },
        ...lines.map((l) => ({
          label: l.raw ? `${l.name} (raw)` : l.name,
          stroke: PALETTE[l.color % PALETTE.length] + (l.raw && smoothed ? "40" : ""),
          width: l.raw ? 1 : 1.5, spanGaps: true,
          points: { show: !l.raw && (o.points ?? false), size: 6 },
        }))],
      legend: { live: true },
      hooks: { setSeries: [(u, i, opts) => pairRaw(u, i, opts)] },
    }, data, this.plotBox);
    // The faint raw lines stay out of the legend: their smoothed line's entry shows and hides both.
    this.u.series.forEach((s, i) => {
      if (i && s.label.endsWith(" (raw)")) this.u.root.querySelectorAll(".u-legend .u-series")[i].style.display = "none";
    });
    window.icd.firstChartMs ??= performance.now(); // ms since navigation: read by benchmarks/dashboard_perf.py
  }

  width() {
    return Math.max(280, this.box.clientWidth - 16);
  }

  resize() {
    if (this.u) this.u.setSize({ width: this.width(), height: this.opts.height || 240 });
  }

  destroy() {
    if (this.u) this.u.destroy();
    if (window.icd.charts[this.id] === this) delete window.icd.charts[this.id];
  }
}

/** The log toggle and the smoothing slider of a chart's head. */
function chartControls(c) {
  return `<span class="chart-controls">
    <label title="logarithmic y axis"><input type="checkbox" data-log ${c.log ? "checked" : ""}> log</label>
    <label title="exponential moving average of the logged points (0: raw); the raw line stays faint behind">smooth
      <input type="range" data-smooth min="0" max="0.99" step="0.01" value="${c.smooth}">
      <output data-smooth-value>${c.smooth.toFixed(2)}</output></label></span>`;
}

/** Showing or hiding a smoothed line (legend click) does the same to its raw line just before it. */
function pairRaw(u, i, opts) {
  const raw = u.series[i - 1];
  if (opts?.show === undefined || !raw || raw.label !== `${u.series[i].label} (raw)`) return;
  if (raw.show !== opts.show) u.setSeries(i - 1, { show: opts.show }, false);
}

/** TensorBoard's smoothing: an EMA debiased for its start, skipping gaps (null stays null). */
export function ema(ys, w) {
  let acc = 0;
  let n = 0;
  return ys.map((v) => {
    if (v == null) return null;
    acc = acc * w + (1 - w) * v;
    n++;
    return acc / (1 - w ** n);
  });
}

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
