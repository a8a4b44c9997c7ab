"""The lineage section of a study's or a sweep's report: what the runs ran on, and where they differ.

Each row may carry `lineage` (icd_core.lineage). The nested dict is flattened to dotted keys
(`code.version`, `packages.torch`, `data.train`, `teacher_sha256`, ...); a key with one value across the
runs is listed once, a key with several lists each value with the runs that used it. Runs that differ in
code, packages, data or teacher are not one experiment, so the report says so above its table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Keys that say nothing about a result (the full commit repeats code.version; dirty is in the version).
SKIPPED = ("code.commit", "code.dirty", "code.source")


def flatten(lineage: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"code": {"version": "abc"}} -> {"code.version": "abc"}; None values are left out."""
    out: dict[str, str] = {}
    for key, value in lineage.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif value is not None and name not in SKIPPED:
            out[name] = str(value)
    return out


def run_label(row: Mapping[str, Any]) -> str:
    """ "icd seed 1 (job 12)", "trial 3": how the section names a run."""
    if "method" in row:
        label = f"{row['method']} seed {row['seed']}"
    else:
        label = f"trial {row.get('number')}"
    return label + (f" (job {row['job_id']})" if row.get("job_id") is not None else "")


def lineage_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """{"keys": [{"key", "values": [{"value", "runs"}], "differs"}], "differs": [...], "not_recorded": [...]}
    over the rows that recorded a lineage; None when none did."""
    recorded = [(run_label(r), flatten(r["lineage"])) for r in rows if isinstance(r.get("lineage"), Mapping)]
    if not recorded:
        return None
    keys: list[str] = []
    for _, flat in recorded:
        keys += [k for k in flat if k not in keys]
    entries = []
    for key in keys:
        by_value: dict[str, list[str]] = {}
        for label, flat in recorded:
            by_value.setdefault(flat.get(key, "(none)"), []).append(label)
        values = [{"value": v, "runs": runs} for v, runs in by_value.items()]
        entries.append({"key": key, "values": values, "differs": len(values) > 1})
    return {
        "keys": entries,
        "differs": [e["key"] for e in entries if e["differs"]],
        "not_recorded": [run_label(r) for r in rows if not isinstance(r.get("lineage"), Mapping)],
    }


def lineage_warning(summary: Mapping[str, Any] | None) -> str | None:
    """One line for the top of a report when the runs differ in what they ran on."""
    if not summary or not summary["differs"]:
        return None
    return (
        f"**Warning: the runs did not all run on the same {', '.join(summary['differs'])}** (see Lineage): "
        "their differences may come from that, not from the method."
    )


def lineage_markdown(summary: Mapping[str, Any] | None) -> list[str]:
    """The `## Lineage` section: one row per key, one per value where the runs differ."""
    if not summary:
        return []
    lines = ["", "## Lineage", "", "| what | value | runs |", "|---|---|---|"]
    for entry in summary["keys"]:
        for value in entry["values"]:
            what = f"**{entry['key']} (differs)**" if entry["differs"] else entry["key"]
            runs = ", ".join(value["runs"]) if entry["differs"] else "all"
            lines.append(f"| {what} | `{value['value']}` | {runs} |")
    if summary["not_recorded"]:
        lines.append("")
        lines.append(f"No lineage recorded (ended before its run started): {', '.join(summary['not_recorded'])}.")
    return lines
