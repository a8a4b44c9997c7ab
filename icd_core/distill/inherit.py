"""Inheriting (docs/method/icd.md#inheriting): start the student from the teacher's FPN and detection head.

Only tensors whose name and shape match are copied; the student's bottom-up trunk keeps its own
init. The report lists what was copied and why anything was skipped, so a run's log shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class InheritReport:
    copied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (tensor name, reason)
    prefixes: tuple[str, ...] = ()  # the student's FPN and head, where tensors were to be copied

    def summary(self) -> str:
        text = f"inherited {len(self.copied)} tensors from the teacher, skipped {len(self.skipped)}"
        if self.skipped:
            shown = "; ".join(f"{name} ({why})" for name, why in self.skipped[:5])
            more = f" (+{len(self.skipped) - 5} more)" if len(self.skipped) > 5 else ""
            text += f": {shown}{more}"
        return text


def inherit_from_teacher(teacher: nn.Module, student: nn.Module) -> InheritReport:
    """Copy every FPN + head tensor (parameters and buffers) whose name and shape match, in place."""
    prefixes = tuple(student.head_state_prefixes())
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    report = InheritReport(prefixes=prefixes)
    with torch.no_grad():
        for name, dst in s_state.items():
            if not name.startswith(prefixes):
                continue
            src = t_state.get(name)
            if src is None:
                report.skipped.append((name, "not in teacher"))
            elif src.shape != dst.shape:
                report.skipped.append((name, f"shape {tuple(src.shape)} in teacher vs {tuple(dst.shape)}"))
            else:
                dst.copy_(src)
                report.copied.append(name)
        for name in t_state:
            if name.startswith(prefixes) and name not in s_state:
                report.skipped.append((name, "not in student"))
    return report


def require_inherited(report: InheritReport) -> None:
    """`distill.inherit: true` that copied nothing is a failure: the student would silently start from its
    own random FPN and head, and its AP would be read as the method's (docs/method/icd.md#inheriting)."""
    if report.copied:
        return
    reasons: dict[str, int] = {}
    for _, why in report.skipped:
        kind = why.split(" ", 1)[0] if why.startswith("shape") else why
        reasons[kind] = reasons.get(kind, 0) + 1
    why = ", ".join(f"{n} {'differ in shape' if kind == 'shape' else kind}" for kind, n in reasons.items())
    examples = "; ".join(f"{name} ({reason})" for name, reason in report.skipped[:3])
    raise ValueError(
        f"distill.inherit: nothing was copied from the teacher. Expected its FPN and head tensors "
        f"({', '.join(report.prefixes) or 'none'}) to match the student's by name and shape, but of "
        f"the {len(report.skipped)} tensors compared {why or 'none was found'}"
        + (f" (e.g. {examples})" if examples else "")
        + ". Give teacher and student the same detector, fpn_channels, head_convs, head_norm, levels and "
        "anchor_sizes, use a teacher checkpoint of this service's detector (icd import-teacher converts "
        "others), or set distill.inherit: false to start the student's FPN and head from scratch"
    )
