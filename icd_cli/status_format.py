"""What `icd status` and `icd wait` print: a job as a short block of labeled lines, numbers rounded.

Only the metrics a person reads first are shown (AP, AP50, AP75, the loss, ICD's diagnostics when the run
reports them); `icd status ID --json` prints everything the API returns.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

# ICD's diagnostics that can say "not working" (AUC, recall, in-box attention mass, localization error);
# the identification accuracy is left out: at a threshold it sits at the share of fake queries.
ICD_KEYS = ("icd_ident_auc", "icd_real_recall", "icd_inbox_mass", "icd_inbox_uniform", "icd_loc_error")
AP_KEYS = (("AP", "ap"), ("AP50", "ap50"), ("AP75", "ap75"))
LABEL_WIDTH = 10


def duration(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _line(label: str, text: str) -> str:
    return f"  {label:<{LABEL_WIDTH}} {text}"


def _num(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, int | float) else "-"


def _sig(v: float) -> str:
    """4 significant digits: a loss of 0.01234 and one of 123.4 both stay readable."""
    return f"{v:.4g}"


def _parse_time(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")) if iso else None


def _progress(job: dict[str, Any]) -> str:
    total = job.get("progress_total")
    unit = "children ended" if job["kind"] == "study" else "steps"
    text = f"{job['progress_step']}{'/' + str(total) if total else ''} {unit}"
    if job.get("percent") is not None:
        text += f" ({job['percent']:.0f} %)"
    if job["status"] == "running" and job.get("eta_s") is not None:
        text += f", ETA {duration(job['eta_s'])}"
    return text + f"; attempt {job['attempt']}, worker {job.get('worker') or '-'}"


def _timing(job: dict[str, Any], now: datetime | None = None) -> str:
    parts = []
    started, finished = _parse_time(job.get("started_at")), _parse_time(job.get("finished_at"))
    if started is not None:
        end = finished or now or datetime.now(started.tzinfo)
        parts.append(f"ran {duration((end - started).total_seconds())}" + ("" if finished else " so far"))
    if job.get("sec_per_step") is not None:
        parts.append(f"{job['sec_per_step']:.3g} s/step")
    if job.get("peak_memory_mb") is not None:
        parts.append(f"peak {job['peak_memory_mb']:.0f} MiB")
    return ", ".join(parts)


def _ap_line(values: dict[str, Any], keys: tuple[tuple[str, str], ...]) -> str:
    """`AP 12.34 · AP50 30.12 · AP75 8.90` from whichever of the keys are numbers."""
    return " · ".join(f"{label} {_num(values[k])}" for label, k in keys if isinstance(values.get(k), int | float))


def teacher_line(metrics: dict[str, Any]) -> str:
    """A distill job's teacher AP (measured on data.val before training) beside its student's."""
    if metrics.get("teacher_AP") is None:
        return ""
    teacher = "  ".join(
        f"{k} {metrics['teacher_' + k]:.2f}" for k in ("AP", "AP50") if metrics.get("teacher_" + k) is not None
    )
    student = f"AP {metrics['AP']:.2f}" if metrics.get("AP") is not None else "-"
    return f"  teacher: {teacher}  (student: {student})"


def metric_lines(job: dict[str, Any], last_eval: dict[str, Any] | None) -> list[str]:
    """AP (the final one, else the last evaluation's), the loss and ICD's diagnostics."""
    final = job.get("final_metrics") or {}
    lines = []
    if job["kind"] == "study":
        by_method = [(k[3:], v) for k, v in final.items() if k.startswith("AP_") and isinstance(v, int | float)]
        if by_method:
            lines.append(_line("AP", " · ".join(f"{m} {_num(v)}" for m, v in by_method) + " (mean over seeds)"))
        return lines
    ap = _ap_line(final, tuple((label, label) for label, _ in AP_KEYS))
    if ap:
        lines.append(_line("eval", ap))
    elif last_eval:
        lines.append(_line("eval", f"{_ap_line(last_eval, AP_KEYS)} (at step {last_eval['step']})"))
    if teacher_line(final):
        lines.append(teacher_line(final))
    if isinstance(final.get("loss"), int | float):
        lines.append(_line("loss", _sig(final["loss"])))
    icd = [f"{k[4:]} {_num(final[k], 3)}" for k in ICD_KEYS if isinstance(final.get(k), int | float)]
    if icd:
        lines.append(_line("ICD", " · ".join(icd)))
    return lines


def _short_hash(value: Any) -> str:
    """ "sha256:0a1b2c3d4e5f…" -> "0a1b2c3d4e5f": enough to tell two hashes apart at a glance."""
    return str(value).removeprefix("sha256:")[:12]


def lineage_line(job: dict[str, Any]) -> str:
    """What the run ran on, in one line: code version, data hashes, teacher (`--json` has every field)."""
    lineage = job.get("lineage")
    if not isinstance(lineage, dict):
        return ""
    parts = [f"code {(lineage.get('code') or {}).get('version', '-')}"]
    data = lineage.get("data") or {}
    if data:
        parts.append("data " + ", ".join(f"{split} {_short_hash(h)}" for split, h in data.items()))
    if lineage.get("teacher_sha256"):
        parts.append(f"teacher {_short_hash(lineage['teacher_sha256'])}")
    torch = (lineage.get("packages") or {}).get("torch")
    if torch:
        parts.append(f"torch {torch}")
    return _line("lineage", " · ".join(parts))


def status_lines(job: dict[str, Any], last_eval: dict[str, Any] | None, now: datetime | None = None) -> list[str]:
    """The whole `icd status` block."""
    lines = [f"job {job['id']}  {job['name']}  ({job['kind']})  {job['status']}"]
    lines.append(_line("progress", _progress(job)))
    timing = _timing(job, now)
    if timing:
        lines.append(_line("time", timing))
    if job.get("parent_id"):
        lines.append(_line("parent", str(job["parent_id"])))
    if job.get("priority"):
        lines.append(
            _line(
                "priority",
                str(job["priority"]) + (f", preempted {job['preemptions']}x" if job.get("preemptions") else ""),
            )
        )
    lines += metric_lines(job, last_eval)
    if lineage_line(job):
        lines.append(lineage_line(job))
    if job.get("status_detail"):
        lines.append(_line("note", job["status_detail"]))
    if job.get("error"):
        lines.append(_line("error", job["error"]))
    if job.get("final_metrics"):
        lines.append(f"  (every metric: icd status {job['id']} --json)")
    return lines


def wait_postfix(job: dict[str, Any]) -> str:
    """The one line beside `icd wait`'s bar: status, the job's own step time and the server's ETA."""
    parts = [job["status"]]
    if job.get("sec_per_step"):
        parts.append(f"{job['sec_per_step']:.3g} s/step")
    if job["status"] == "running" and job.get("eta_s") is not None:
        parts.append(f"ETA {duration(job['eta_s'])}")
    return ", ".join(parts)
