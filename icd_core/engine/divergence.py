"""Divergence beyond NaN/inf: a finite loss that explodes (issue 10 item 5).

A run at 10× its stable learning rate took its classification loss 1.1 → 1,738 → 832,905 in 20 steps
while every value stayed finite, and ended `succeeded`. The rule here: a step *spikes* when its total
loss exceeds `factor` × the median of the last `window` non-spiking steps; `patience` consecutive
spikes mean the run diverged. Why these numbers:
- the median ignores the single hard batches that a mean would chase, and the spiking steps are kept
  out of the history, so a run cannot raise its own bar while it blows up;
- 10× is far above healthy noise: over the 27 runs of the shapes studies (metrics.jsonl, 10-step
  means) no window exceeded 1.21× the median of the previous 50 steps, and a single batch with many
  objects moves a per-step detection loss by a few times at most; the diverging run passed 1,000×;
- 3 consecutive spikes let one freak batch through (the next steps return below the bar) yet stop
  an explosion within 3 steps of its start;
- the first `min_history` steps only fill the history: the loss falls fast at the start of training,
  so early steps say nothing about its stable level.

A second rule catches a one-step explosion that returns at once (issue 23 item 14: an FGFI loss went
22 → 5,872,373 in one step and back, fewer than `patience` spikes, and the run ended `succeeded`): a
single step above `jump_factor` (100) × the running median means divergence, without patience. The
gradient of such a step is of the same excess (unless grad_clip bounds it), and on the GPU, where the
trainer checks once per log window, it has already been applied: the weights after it are not the
ones the run was converging to, even when the next loss looks normal.
Why 100: the guard sees every step's total loss (the sum of all detection and distillation terms, not
averaged); metrics.jsonl logs the mean of each `log_every` (10) window. Over every loss series of the
77 metrics.jsonl files under benchmarks/results (375 series, 16,220 logged means; 71 runs outlast the
20-row warm-up, so 9,070 means meet the rules; replayed in tests/core/test_divergence.py) no logged
mean exceeded 1.43× the median of the previous 50 means, so no single step of a window (losses are
≥ 0) exceeded 14.3× it; the reported explosion was 267,000×.
"""

from __future__ import annotations

import statistics
from collections import deque


class LossSpikeGuard:
    """Feed it every step's finite total loss; `update` returns a reason string once the run diverged.

    jump_factor=None turns the one-step rule off (only the patience rule is left).
    """

    def __init__(
        self,
        factor: float = 10.0,
        window: int = 50,
        patience: int = 3,
        min_history: int = 20,
        jump_factor: float | None = 100.0,
    ):
        if factor <= 1.0 or window < 1 or patience < 1 or min_history < 1:
            raise ValueError("LossSpikeGuard needs factor > 1, window ≥ 1, patience ≥ 1, min_history ≥ 1")
        if jump_factor is not None and jump_factor <= factor:
            raise ValueError("LossSpikeGuard needs jump_factor > factor (or None to turn the one-step rule off)")
        self.factor = float(factor)
        self.jump_factor = None if jump_factor is None else float(jump_factor)
        self.patience = int(patience)
        self.min_history = min(int(min_history), int(window))
        self.history: deque[float] = deque(maxlen=int(window))
        self.streak = 0
        self.first_spike: int | None = None

    @property
    def suspect(self) -> bool:
        """True while the last steps spiked: a checkpoint written now may hold diverging weights."""
        return self.streak > 0

    def update(self, step: int, loss: float) -> str | None:
        if len(self.history) < self.min_history:
            self.history.append(loss)
            return None
        median = statistics.median(self.history)
        if self.jump_factor is not None and loss > self.jump_factor * median:
            return (
                f"loss {loss:.4g} jumped above {self.jump_factor:g}× the running median {median:.4g} "
                f"in one step (step {step})"
            )
        if loss > self.factor * median:
            if self.streak == 0:
                self.first_spike = step
            self.streak += 1
            if self.streak >= self.patience:
                return (
                    f"loss {loss:.4g} above {self.factor:g}× the running median {median:.4g} for {self.streak} "
                    f"steps (since step {self.first_spike})"
                )
            return None
        self.streak = 0
        self.first_spike = None
        self.history.append(loss)
        return None
