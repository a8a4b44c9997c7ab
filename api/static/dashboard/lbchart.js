// The study's leaderboard chart: mean AP per method as bars, the teacher's AP as a dashed line across
// them (the ceiling a student is distilled towards).

const TEACHER = "#9a6700";

/** Draw into `box`; `teacherAp` may be null (not known yet). Returns the uPlot (or null with no bars). */
export function leaderboardChart(box, rows, teacherAp) {
  const done = rows.filter((r) => r.mean != null);
  box.innerHTML = done.length ? "" : `<div class="empty">the chart fills in as children succeed</div>`;
  window.icd.studyChart = { teacherAp: teacherAp ?? null, methods: done.map((r) => r.method) };
  if (!done.length) return null;
  const xs = done.map((_, i) => i);
  const top = Math.max(...done.map((r) => r.mean), teacherAp ?? 0);
  return new uPlot({
    width: Math.min(640, Math.max(260, box.clientWidth - 16)), height: 220,
    scales: { x: { time: false, range: [-0.6, done.length - 0.4] }, y: { range: [0, top > 0 ? top * 1.15 : 1] } },
    axes: [{ label: "method", values: (_, ticks) => ticks.map((t) => done[t]?.method ?? ""), splits: () => xs },
      { label: "AP (%)", size: 55 }],
    series: [{ label: "method", value: (_, i) => done[i]?.method ?? "" },
      { label: "mean AP", stroke: "#0969da", fill: "#0969da55", paths: uPlot.paths.bars({ size: [0.6, 80] }),
        points: { show: false } }],
    hooks: { draw: [(u) => teacherAp != null && teacherLine(u, teacherAp)] },
  }, [xs, done.map((r) => r.mean)], box);
}

function teacherLine(u, ap) {
  const { ctx, bbox } = u;
  const y = Math.round(u.valToPos(ap, "y", true));
  ctx.save();
  ctx.strokeStyle = TEACHER;
  ctx.lineWidth = 2 * devicePixelRatio;
  ctx.setLineDash([6 * devicePixelRatio, 4 * devicePixelRatio]);
  ctx.beginPath();
  ctx.moveTo(bbox.left, y);
  ctx.lineTo(bbox.left + bbox.width, y);
  ctx.stroke();
  // The label sits at the left end on a white patch, so a bar behind it cannot hide it.
  const text = `teacher ${ap.toFixed(2)}`;
  ctx.setLineDash([]);
  ctx.font = `${12 * devicePixelRatio}px system-ui, sans-serif`;
  const w = ctx.measureText(text).width;
  const h = 15 * devicePixelRatio;
  const x = bbox.left + 4 * devicePixelRatio;
  const top = Math.max(bbox.top, y - h - 3 * devicePixelRatio);
  ctx.fillStyle = "#ffffffdd";
  ctx.fillRect(x - 2 * devicePixelRatio, top, w + 4 * devicePixelRatio, h);
  ctx.fillStyle = TEACHER;
  ctx.textAlign = "left"; // uPlot leaves it as its y axis set it
  ctx.textBaseline = "top";
  ctx.fillText(text, x, top + 2 * devicePixelRatio);
  ctx.restore();
}
