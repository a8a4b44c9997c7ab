// Training time at a step, from the run's own logged step times: each logged point's `sec_per_step` (the
// mean over its log window) times the steps since the previous logged point, summed. Computed in the
// browser; it counts training steps only (not evaluations, checkpoints or time spent queued).

export const CLOCK_NOTE = "training time = Σ sec_per_step × steps between logged points, computed in the " +
  "browser from the run's logged step times (evaluation, checkpoints and queueing not counted)";

/** `series()` returns the current {xs: steps, ys: sec_per_step} (or nothing before the first point). */
export function trainingClock(series) {
  let cache = { n: -1, steps: [], secs: [] };

  function table() {
    const s = series();
    if (!s || !s.xs.length) return null;
    if (cache.n !== s.xs.length || cache.last !== s.xs[s.xs.length - 1]) {
      const steps = [0];
      const secs = [0];
      for (let i = 0; i < s.xs.length; i++) {
        const step = s.xs[i];
        if (step <= steps[steps.length - 1]) continue;
        const sps = s.ys[i] ?? 0;
        secs.push(secs[secs.length - 1] + sps * (step - steps[steps.length - 1]));
        steps.push(step);
      }
      cache = { n: s.xs.length, last: s.xs[s.xs.length - 1], steps, secs, lastRate: s.ys[s.ys.length - 1] ?? 0 };
    }
    return cache;
  }

  /** Seconds of training at `step`: interpolated between logged points, extrapolated at the last rate. */
  function at(step) {
    const t = table();
    if (!t) return step == null ? null : 0;
    const { steps, secs } = t;
    const end = steps.length - 1;
    if (step >= steps[end]) return secs[end] + (step - steps[end]) * t.lastRate;
    let lo = 0;
    let hi = end;
    while (hi - lo > 1) {
      const mid = (lo + hi) >> 1;
      if (steps[mid] <= step) lo = mid; else hi = mid;
    }
    const f = (step - steps[lo]) / (steps[hi] - steps[lo]);
    return secs[lo] + f * (secs[hi] - secs[lo]);
  }

  /** Training seconds up to the last logged point (null before any). */
  const total = () => {
    const t = table();
    return t ? t.secs[t.secs.length - 1] : null;
  };
  return { at, total };
}

/** A compact tick label for seconds: 45s, 12m30s, 3h05m. */
export function clockLabel(s) {
  if (s == null || !isFinite(s)) return "";
  if (s < 60) return `${Number(s.toPrecision(2))}s`;
  const m = Math.floor(s / 60);
  if (s < 3600) return `${m}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(m % 60).padStart(2, "0")}m`;
}
