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
    report = InheritReport()
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
