"""The student's optimizer and LR schedule: SGD with momentum, linear warm-up, then multi-step decay.

Kept as a plain LambdaLR so its state is a step counter that checkpoints and resumes trivially.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..spec import ScheduleSpec


def warmup_multistep(warmup_iters: int, warmup_factor: float, steps: list[int], gamma: float) -> Callable[[int], float]:
    """LR multiplier at iteration i: linear from warmup_factor to 1 over warmup_iters, times gamma per passed step."""

    milestones = sorted(steps)

    def factor(i: int) -> float:
        decay = gamma ** bisect_right(milestones, i)
        if i >= warmup_iters:
            return decay
        alpha = i / warmup_iters
        return decay * (warmup_factor * (1.0 - alpha) + alpha)

    return factor


def make_sgd(params: Iterable[nn.Parameter], schedule: ScheduleSpec, lr: float) -> torch.optim.SGD:
    """SGD with the schedule's momentum and weight decay (applied to every parameter, as detectron2's default)."""
    return torch.optim.SGD(list(params), lr=lr, momentum=schedule.momentum, weight_decay=schedule.weight_decay)


def make_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleSpec) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up + multi-step LambdaLR stepped once per iteration."""
    fn = warmup_multistep(schedule.resolved_warmup(), schedule.warmup_factor, schedule.resolved_steps(), schedule.gamma)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
