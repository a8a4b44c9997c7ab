"""The study leaderboard: per-method mean ± std over seeds, gains and costs against `none`, the teacher's row.

Inputs are plain dicts so the same code serves the CLI (results read from each child's summary.json)
and the service (rows read from the database). One child result looks like

    {"method": "icd", "seed": 0,
     "metrics": {"AP": 12.3, "AP50": ..., "AP75": ..., "APs": ..., "APm": ..., "APl": ...},
     "sec_per_step": 0.91, "peak_memory_mb": 812.0}

(`sec_per_step` and `peak_memory_mb` may also sit inside `metrics`; `metrics: None` marks a child that
failed or was canceled: it is counted, not averaged; `lineage`, what it ran on, is listed in the report's
Lineage section, icd_core.lineage_report). The teacher row is `{"metrics": {...}}` plus
optional `name`/`checkpoint`; without one, the teacher AP the runs measured before training
(`teacher_AP`, ... in their metrics) makes it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic_files import replaced_atomically, write_text_atomic
from .json_numbers import finite_or_none
from .lineage_report import lineage_markdown, lineage_summary, lineage_warning
from .paired_stats import paired_delta

AP_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BASELINE = "none"
# The teacher's AP as each distill run measured it before training (icd_core.teacher_eval): teacher_AP, ...
TEACHER_PREFIX = "teacher_"
TEACHER_AP_METRICS = tuple(TEACHER_PREFIX + m for m in AP_METRICS)
# Deployment cost of a row's model: `cost_<key>` (and `teacher_cost_<key>`) in its metrics, from run_report.
COST_KEYS = (
    "params_m",
    "gflops",
    "peak_inference_mb",
    "latency_ms",
    "latency_ms_torchscript",
    "latency_ms_onnxruntime",
)
# ICD's decoder readiness at the end of a child (icd_core.distill.icd_diagnostics): mean over seeds.
ICD_DIAGNOSTICS = (
    "icd_ident_auc",
    "icd_real_recall",
    "icd_inbox_mass",
    "icd_inbox_uniform",
    "icd_loc_error",
    "icd_pretrain_steps",
    "icd_pretrain_seconds",
)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n-1 in the denominator; 0 for a single value)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _cost(row: Mapping[str, Any], key: str) -> float | None:
    """A cost figure from the row itself or from its metrics dict; None when unknown."""
    value = row.get(key)
    if value is None and isinstance(row.get("metrics"), Mapping):
        value = row["metrics"].get(key)
    return None if value is None else float(value)


def _diagnostic(row: Mapping[str, Any], key: str) -> float | None:
    """An ICD diagnostic of a child: on the held-out batch (icd_heldout_*, measured at evaluation) when the
    run has it, else on the last training batch before its update (icd_*)."""
    heldout = _cost(row, key.replace("icd_", "icd_heldout_", 1))
    return heldout if heldout is not None else _cost(row, key)


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def build_leaderboard(
    results: Sequence[Mapping[str, Any]],
    teacher: Mapping[str, Any] | None = None,
    name: str = "study",
    notes: Sequence[str] = (),
    tuning: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Aggregate child results into the report dict (JSON-ready); methods sorted by mean AP, best first.

    notes: caveats printed under the markdown table (e.g. how memory was measured).
    tuning: a tuned study's summary (icd_core.study.tune_methods): the split and each method's sweep.
    """
    by_method: dict[str, list[Mapping[str, Any]]] = {}
    for row in results:
        by_method.setdefault(str(row["method"]), []).append(row)

    methods = []
    for method, rows in by_method.items():
        done = [r for r in rows if isinstance(r.get("metrics"), Mapping) and "AP" in r["metrics"]]
        entry: dict[str, Any] = {
            "method": method,
            "n": len(done),
            "failed": len(rows) - len(done),
            "seeds": sorted(int(r["seed"]) for r in done),
        }
        for metric in AP_METRICS:
            mean, std = mean_std([float(r["metrics"].get(metric, 0.0)) for r in done])
            entry[metric] = {"mean": mean, "std": std}
        entry["sec_per_step"] = _mean_or_none([_cost(r, "sec_per_step") for r in done])
        entry["peak_memory_mb"] = _mean_or_none([_cost(r, "peak_memory_mb") for r in done])
        entry["model_cost"] = _model_cost(done)
        entry["setting"] = _shared_setting(done)
        diagnostics = {key: _mean_or_none([_diagnostic(r, key) for r in done]) for key in ICD_DIAGNOSTICS}
        if any(v is not None for v in diagnostics.values()):
            entry["icd_diagnostics"] = diagnostics
        methods.append(entry)

    base = next((m for m in methods if m["method"] == BASELINE and m["n"]), None)
    base_ap = _ap_by_seed(by_method.get(BASELINE, []))
    for entry in methods:
        _add_deltas(entry, base)
        paired = paired_delta(_ap_by_seed(by_method[entry["method"]]), base_ap) if entry["method"] != BASELINE else None
        entry["paired_delta_AP"] = paired.as_dict() if paired else None

    # Methods with no finished run sink to the bottom; ties keep the order of the input.
    methods.sort(key=lambda m: -m["AP"]["mean"] if m["n"] else math.inf)
    teacher_row = _teacher_row(teacher if teacher is not None else _teacher_from_runs(results))
    if teacher_row is not None:
        teacher_row["model_cost"] = _teacher_cost(teacher, results)
        for entry in methods:
            entry["vs_teacher"] = _vs_teacher(entry, teacher_row)
    report: dict[str, Any] = {
        "name": name,
        "verdict": verdict(methods),
        "baseline": BASELINE if base else None,
        "teacher": teacher_row,
        "methods": methods,
        "runs": [_run_row(r) for r in results],
        "notes": list(notes),
        "lineage": lineage_summary(results),
    }
    if tuning is not None:
        report["tuning"] = dict(tuning)
    return finite_or_none(report)


def _ap_by_seed(rows: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    done = [r for r in rows if isinstance(r.get("metrics"), Mapping) and "AP" in r["metrics"]]
    return {int(r["seed"]): float(r["metrics"]["AP"]) for r in done}


def _shared_setting(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The method's tuned or chosen parameters (`params` of its runs) when every run used the same ones."""
    settings = [r.get("params") for r in rows if r.get("params")]
    if not settings or any(s != settings[0] for s in settings):
        return None
    return dict(settings[0])


def setting_text(setting: Mapping[str, Any] | None) -> str:
    """ "weight 4, adapter_lr 0.001" from {"distill.weight": 4.0, "distill.icd.adapter_lr": 0.001}."""
    if not setting:
        return ""
    return ", ".join(f"{str(k).rsplit('.', 1)[-1]} {_short_number(v)}" for k, v in setting.items())


def _short_number(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def verdict(methods: Sequence[Mapping[str, Any]]) -> str:
    """One sentence a user can act on: which method beats `none`, by how much, how sure, at what cost."""
    rows = [m for m in methods if m.get("paired_delta_AP")]
    if not rows:
        return "No method ran beside `none` on shared seeds, so no gain can be measured: add `none` to the methods."
    n_max = max(m["paired_delta_AP"]["n"] for m in rows)
    if n_max < 2:
        return (
            "One seed per method cannot separate a gain from seed noise: run at least 2 seeds (3 or more to "
            "detect gains of a few AP)."
        )
    winners = [m for m in rows if m["paired_delta_AP"]["distinguishable"] and m["paired_delta_AP"]["mean"] > 0]
    if winners:
        best = max(winners, key=lambda m: m["paired_delta_AP"]["mean"])
        p = best["paired_delta_AP"]
        setting = setting_text(best.get("setting"))
        cost = best.get("extra_sec_per_step_pct")
        cost_text = (
            f", at the student's inference cost and {cost:+.0f} % training time per step"
            if cost is not None
            else ", at the student's inference cost"
        )
        return (
            f"On this data, {best['method']}{f' ({setting})' if setting else ''} beats `none` by "
            f"{p['mean']:+.1f} AP (95 % CI [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}], {p['n']} seeds){cost_text}."
        )
    best = max(rows, key=lambda m: m["paired_delta_AP"]["mean"])
    p = best["paired_delta_AP"]
    ci = f"95 % CI [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]" if p["ci_low"] is not None else "no interval"
    worse = [m["method"] for m in rows if m["paired_delta_AP"]["distinguishable"] and m["paired_delta_AP"]["mean"] < 0]
    tail = f"; {', '.join(worse)} {'is' if len(worse) == 1 else 'are'} worse than `none`" if worse else ""
    return (
        f"No method is distinguishable from `none` at {n_max} seeds (best: {best['method']} {p['mean']:+.1f} AP, "
        f"{ci}){tail}: run more seeds or a longer schedule."
    )


def _add_deltas(entry: dict[str, Any], base: Mapping[str, Any] | None) -> None:
    """Δ of every AP metric, and the extra step time and memory, against the `none` means."""
    ok = base is not None and entry["n"] > 0
    entry["delta"] = {m: (entry[m]["mean"] - base[m]["mean"]) if ok else None for m in AP_METRICS}
    entry["delta_AP"] = entry["delta"]["AP"]
    sps, base_sps = entry["sec_per_step"], base["sec_per_step"] if base else None
    if ok and sps is not None and base_sps is not None:
        entry["extra_sec_per_step"] = sps - base_sps
        entry["extra_sec_per_step_pct"] = 100.0 * (sps - base_sps) / base_sps if base_sps > 0 else None
    else:
        entry["extra_sec_per_step"] = entry["extra_sec_per_step_pct"] = None
    mem, base_mem = entry["peak_memory_mb"], base["peak_memory_mb"] if base else None
    entry["extra_peak_memory_mb"] = mem - base_mem if ok and mem is not None and base_mem is not None else None


def _teacher_row(teacher: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if teacher is None:
        return None
    metrics = teacher.get("metrics", teacher)
    row = {m: float(metrics.get(m, 0.0)) for m in AP_METRICS}
    for key in ("name", "checkpoint"):
        if teacher.get(key) is not None:
            row[key] = str(teacher[key])
    return row


def _teacher_from_runs(results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The teacher's row from what the runs measured of it (every run of a study shares one teacher), for a
    report given no teacher evaluation of its own; None when no run recorded one."""
    measured = [r for r in results if _cost(r, TEACHER_AP_METRICS[0]) is not None]
    if not measured:
        return None
    metrics = {m: _mean_or_none([_cost(r, TEACHER_PREFIX + m) for r in measured]) or 0.0 for m in AP_METRICS}
    return {"name": "as evaluated by the runs", "metrics": metrics}


def cost_from_metrics(metrics: Mapping[str, Any] | None) -> dict[str, dict[str, float]] | None:
    """{"student"|"model": {params_m, gflops, ...}, "teacher": {...}} from a run's flat `cost_*` metrics."""
    if not metrics:
        return None
    out: dict[str, dict[str, float]] = {}
    for prefix, name in (("teacher_cost_", "teacher"), ("cost_", "model")):
        figures = {k: float(metrics[prefix + k]) for k in COST_KEYS if metrics.get(prefix + k) is not None}
        if figures:
            out[name] = figures
    return out or None


def _model_cost(rows: Sequence[Mapping[str, Any]], prefix: str = "cost_") -> dict[str, float | None]:
    """Mean deployment cost (see icd_core.run_report.flat_cost) over rows; None where no row measured it."""
    return {key: _mean_or_none([_cost(r, prefix + key) for r in rows]) for key in COST_KEYS}


def _teacher_cost(teacher: Mapping[str, Any] | None, results: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The teacher's cost: its own row's `cost_*` if given, else what the children measured of it
    (`teacher_cost_*`, taken in the same run, on the same device, as each student's figures)."""
    own = _model_cost([teacher]) if teacher is not None else {}
    if any(v is not None for v in own.values()):
        return own
    done = [r for r in results if isinstance(r.get("metrics"), Mapping)]
    return _model_cost(done, prefix="teacher_cost_")


def _vs_teacher(entry: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, float | None]:
    """Speed-up (teacher latency / student latency), FLOPs and parameter fractions, % of the teacher's AP."""
    mine, theirs = entry.get("model_cost") or {}, teacher.get("model_cost") or {}

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    ap, teacher_ap = entry["AP"]["mean"], teacher.get("AP")
    return {
        "speedup": ratio(theirs.get("latency_ms"), mine.get("latency_ms")),
        "flops_fraction": ratio(mine.get("gflops"), theirs.get("gflops")),
        "params_fraction": ratio(mine.get("params_m"), theirs.get("params_m")),
        "ap_pct": 100.0 * ap / teacher_ap if entry["n"] and teacher_ap else None,
    }


def vs_teacher_text(vs: Mapping[str, float | None] | None) -> str:
    """ "2.9× faster, 1/4 the FLOPs, 94 % of the teacher's AP" (parts without figures left out)."""
    if not vs:
        return "–"
    parts = []
    if vs.get("speedup") is not None:
        s = vs["speedup"]
        parts.append(f"{s:.1f}× faster" if s >= 1 else f"{1 / s:.1f}× slower")
    if vs.get("flops_fraction") is not None:
        parts.append(_fraction(vs["flops_fraction"]) + " the FLOPs")
    if vs.get("ap_pct") is not None:
        parts.append(f"{vs['ap_pct']:.0f} % of the teacher's AP")
    return ", ".join(parts) or "–"


def _fraction(x: float) -> str:
    """0.26 -> "1/4", 1.0 -> "1×", 2.1 -> "2.1×": the form people say a size ratio in."""
    if 0 < x < 0.95:
        return f"1/{1 / x:.0f}" if 1 / x >= 1.95 else f"{x:.2f}×"
    return f"{x:.1f}×" if x != 1.0 else "1×"


def _run_row(row: Mapping[str, Any]) -> dict[str, Any]:
    metrics = row.get("metrics") if isinstance(row.get("metrics"), Mapping) else None
    out: dict[str, Any] = {
        "method": str(row["method"]),
        "seed": int(row["seed"]),
        "metrics": {m: float(metrics[m]) for m in AP_METRICS if m in metrics} if metrics else None,
        "sec_per_step": _cost(row, "sec_per_step"),
        "peak_memory_mb": _cost(row, "peak_memory_mb"),
        "model_cost": _model_cost([row]),
    }
    teacher_ap = _cost(row, TEACHER_AP_METRICS[0])
    if teacher_ap is not None:  # the teacher this run distilled from, evaluated before it trained
        out["teacher_AP"] = teacher_ap
    diagnostics = {key: _diagnostic(row, key) for key in ICD_DIAGNOSTICS if _diagnostic(row, key) is not None}
    if diagnostics:
        out["icd_diagnostics"] = diagnostics
    for key in ("status", "job_id", "error"):
        if row.get(key) is not None:
            out[key] = row[key]
    return out


def paired_text(p: Mapping[str, Any] | None) -> str:
    """ "+2.1 [+0.4, +3.8]", "+0.3 [−1.2, +1.8] ≈0", or "+0.3 (1 seed)"."""
    if not p:
        return "–"
    if p.get("ci_low") is None:
        return f"{p['mean']:+.1f} ({p['n']} seed{'s' if p['n'] != 1 else ''})"
    mark = "" if p["distinguishable"] else " ≈0"
    return f"{p['mean']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]{mark}"


def _fmt(value: float | None, digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _pm(stat: Mapping[str, float | None]) -> str:
    if stat["mean"] is None:
        return "–"
    return f"{stat['mean']:.1f} ± {_fmt(stat['std'])}"


def leaderboard_markdown(report: Mapping[str, Any]) -> str:
    """A markdown table: the teacher first, then the methods by mean AP (mean ± sample std over seeds)."""
    head = [
        "method",
        "seeds",
        *AP_METRICS,
        "Δ AP",
        "paired Δ AP (95 % CI)",
        "setting",
        "s/step",
        "Δ s/step",
        "peak MB",
        "Δ MB",
        *COST_HEAD,
        "vs teacher",
    ]
    warning = lineage_warning(report.get("lineage"))
    lines = [warning, ""] if warning else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    teacher = report.get("teacher")
    if teacher:
        label = "teacher" + (f" ({teacher['name']})" if teacher.get("name") else "")
        cells = [
            label,
            "–",
            *(_fmt(teacher[m]) for m in AP_METRICS),
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            "–",
            *_cost_cells(teacher.get("model_cost")),
            "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for m in report["methods"]:
        pct = m.get("extra_sec_per_step_pct")
        extra = _fmt(m.get("extra_sec_per_step"), 3, signed=True)
        if pct is not None:
            extra += f" ({pct:+.0f}%)"
        n = f"{m['n']}" + (f" (+{m['failed']} failed)" if m.get("failed") else "")
        cells = [
            m["method"],
            n,
            *(_pm(m[k]) for k in AP_METRICS),
            _fmt(m.get("delta_AP"), signed=True),
            paired_text(m.get("paired_delta_AP")),
            setting_text(m.get("setting")) or "–",
            _fmt(m.get("sec_per_step"), 3),
            extra,
            _fmt(m.get("peak_memory_mb"), 0),
            _fmt(m.get("extra_peak_memory_mb"), 0, signed=True),
            *_cost_cells(m.get("model_cost")),
            vs_teacher_text(m.get("vs_teacher")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.extend(icd_diagnostics_markdown(report))
    lines.extend(tuning_markdown(report.get("tuning")))
    lines.append("")
    lines.append("AP metrics: mean ± sample std over seeds; Δ and costs against the `none` mean.")
    lines.append(
        "Paired Δ AP: mean of (method − `none`) over shared seeds with its 95 % t interval; "
        "≈0 marks an interval that contains 0 (not distinguishable from `none`)."
    )
    lines.append(
        "Model cost: parameters, GFLOPs and peak inference memory at the evaluation size; latency = batch 1, "
        "warm, median, eager (ts = TorchScript, ort = ONNX Runtime, on the CPU)."
    )
    lines.extend(f"Note: {note}" for note in report.get("notes", []))
    lines.extend(lineage_markdown(report.get("lineage")))
    return "\n".join(lines) + "\n"


COST_HEAD = ("params M", "GFLOPs", "infer MB", "ms", "ms ts", "ms ort")


def tuning_markdown(tuning: Mapping[str, Any] | None) -> list[str]:
    """How each method's setting was found: the split it was tuned on, and its sweep's trials and cost."""
    if not tuning:
        return []
    split = tuning.get("split") or {}
    sizes = (
        f" ({split['trained_on_images']} images to train, {split['evaluated_on_images']} held out)"
        if split.get("trained_on_images") is not None and split.get("evaluated_on_images") is not None
        else ""
    )
    lines = [
        "",
        f"Tuned on a split of {split.get('of', 'data.train')}{sizes}: {_fmt(100 * (split.get('fraction') or 0), 0)} % "
        f"held out with seed {split.get('seed')}; each trial trained on the rest and was evaluated on the held-out "
        "part. data.val, which the table reports, was read only by the seeds above. "
        f"Trials used training seed {tuning.get('seed')}.",
        "",
        "| method | best setting | tuning AP | paper setting | trials | pruned | failed | steps | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, t in (tuning.get("methods") or {}).items():
        counts = t.get("counts") or {}
        best = setting_text(t.get("best_params")) or "none finished: paper setting"
        lines.append(
            f"| {method} | {best} | {_fmt(t.get('best_value'))} | {setting_text(t.get('paper_params')) or '–'} | "
            f"{sum(counts.values())} | {counts.get('pruned', 0)} | {counts.get('failed', 0)} | "
            f"{t.get('steps_total', 0)} | {_fmt(t.get('wall_s'), 0)} |"
        )
    return lines


def _cost_cells(cost: Mapping[str, float | None] | None) -> list[str]:
    cost = cost or {}
    digits = {"params_m": 2, "gflops": 2, "peak_inference_mb": 0}
    return [_fmt(cost.get(k), digits.get(k, 1)) for k in COST_KEYS]


def ap_latency_png(report: Mapping[str, Any], path: str | Path) -> Path | None:
    """COCO AP against eager batch-1 latency: one point per finished run, the teacher as a star.

    None (nothing written) when no row has a measured latency."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    runs = [r for r in report["runs"] if r.get("metrics") and (r.get("model_cost") or {}).get("latency_ms")]
    teacher = report.get("teacher")
    t_ms = ((teacher or {}).get("model_cost") or {}).get("latency_ms")
    if not runs and t_ms is None:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.6), dpi=100)
    try:
        colors: dict[str, str] = {}
        for r in runs:
            method = r["method"]
            first = method not in colors
            color = colors.setdefault(method, f"C{len(colors)}")
            ax.scatter(r["model_cost"]["latency_ms"], r["metrics"]["AP"], color=color, label=method if first else None)
        if teacher and t_ms is not None:
            ax.scatter(t_ms, teacher["AP"], marker="*", s=160, color="black", label="teacher")
        ax.set_xlabel("latency, batch 1, eager (ms)")
        ax.set_ylabel("COCO AP (%)")
        ax.set_title(f"{report.get('name', 'study')}: AP vs latency", fontsize=10)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, out)
    finally:
        plt.close(fig)
    return out


def icd_diagnostics_markdown(report: Mapping[str, Any]) -> list[str]:
    """A second table for the ICD rows: is the decoder's mechanism on? (identification AUC, real-query
    recall, in-box attention mass against uniform, localization error; mean over seeds at the end)."""
    rows = [m for m in report["methods"] if m.get("icd_diagnostics")]
    if not rows:
        return []
    head = [
        "method",
        "ident AUC",
        "real recall",
        "in-box mass",
        "uniform",
        "× uniform",
        "loc error",
        "pre-train steps",
        "pre-train s (once per teacher)",
    ]
    lines = ["", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for m in rows:
        d = m["icd_diagnostics"]
        mass, uniform = d.get("icd_inbox_mass"), d.get("icd_inbox_uniform")
        ratio = mass / uniform if mass is not None and uniform else None
        cells = [
            m["method"],
            _fmt(d.get("icd_ident_auc"), 3),
            _fmt(d.get("icd_real_recall"), 3),
            _fmt(mass, 3),
            _fmt(uniform, 3),
            _fmt(ratio, 1),
            _fmt(d.get("icd_loc_error"), 3),
            _fmt(d.get("icd_pretrain_steps"), 0),
            _fmt(d.get("icd_pretrain_seconds"), 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def save_figure(fig: Any, path: Path) -> None:
    """savefig through a temporary beside `path`: the API may serve the chart while a worker writes it."""
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")


def leaderboard_png(report: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of mean AP per method with sample-std error bars; teacher solid line, `none` dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    methods = [m for m in report["methods"] if m["n"]]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(methods) + 2.0), 3.6), dpi=100)
    try:
        xs = list(range(len(methods)))
        colors = [
            "#7f7f7f" if m["method"] == BASELINE else "#e4572e" if m["method"].startswith("icd") else "#4c78a8"
            for m in methods
        ]
        means, stds = [m["AP"]["mean"] for m in methods], [m["AP"]["std"] or 0.0 for m in methods]
        bars = ax.bar(xs, means, yerr=stds, color=colors, capsize=4)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in means], label_type="center", color="white", fontsize=8)
        ax.set_xticks(xs, [m["method"] for m in methods])
        teacher = report.get("teacher")
        if teacher:
            ax.axhline(teacher["AP"], color="black", linewidth=1.2, label=f"teacher {teacher['AP']:.1f}")
        base = next((m for m in methods if m["method"] == BASELINE), None)
        if base:
            ax.axhline(
                base["AP"]["mean"],
                color="#7f7f7f",
                linestyle="--",
                linewidth=1.0,
                label=f"none {base['AP']['mean']:.1f}",
            )
        if teacher or base:
            ax.legend(loc="best", fontsize=8)
        ax.set_ylabel("COCO AP (%)")
        ax.set_title(str(report.get("name", "study")), fontsize=10)
        top = max([m + s for m, s in zip(means, stds)] + [teacher["AP"] if teacher else 0.0, 1.0])
        ax.set_ylim(0, top * 1.25)
        fig.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_figure(fig, out)
    finally:
        plt.close(fig)
    return out


def write_report(
    results: Sequence[Mapping[str, Any]],
    out_dir: str | Path,
    teacher: Mapping[str, Any] | None = None,
    name: str = "study",
    notes: Sequence[str] = (),
    tuning: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md, report.png (and ap_latency.png once latencies exist) into out_dir;
    returns their paths by kind."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = build_leaderboard(results, teacher, name=name, notes=notes, tuning=tuning)
    paths = {"json": out / "report.json", "md": out / "report.md", "png": out / "report.png"}
    write_text_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    write_text_atomic(paths["md"], f"# {name}\n\n{report['verdict']}\n\n" + leaderboard_markdown(report))
    leaderboard_png(report, paths["png"])
    if ap_latency_png(report, out / "ap_latency.png") is not None:
        paths["ap_latency"] = out / "ap_latency.png"
    return paths
