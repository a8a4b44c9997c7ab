// The job page's x-axis switch: every chart by step, or by training time (see clock.js).

import { CLOCK_NOTE, clockLabel, trainingClock } from "./clock.js";

/**
 * Fill `box` with the step / training-time radio pair. `spsSeries()` gives the run's sec_per_step series,
 * `charts()` the page's charts (a Map or an array). Returns {clock, mode(), apply(chart)}: `apply` sets a
 * new chart's x axis to the current mode.
 */
export function xAxisToggle(box, spsSeries, charts) {
  const clock = trainingClock(spsSeries);
  let mode = "step";
  box.className = "x-toggle";
  box.innerHTML = `<span class="muted">x axis</span>
    <label><input type="radio" name="x-axis" value="step" checked> step</label>
    <label title="${CLOCK_NOTE}"><input type="radio" name="x-axis" value="time"> training time</label>`;

  const apply = (chart) => {
    if (mode === "time") chart.setXAxis("training time", (step) => clock.at(step), clockLabel);
    else chart.setXAxis("step");
    return chart;
  };
  for (const input of box.querySelectorAll("input")) {
    input.onchange = () => {
      mode = input.value;
      charts().forEach(apply);
      window.icd.xAxis = mode;
    };
  }
  window.icd.xAxis = mode;
  return { clock, mode: () => mode, apply };
}
