"""Upstream VLA-Adapter learning-rate schedule: linear warm-up from 10% of lr, then x0.1 after a fixed step.

lr(s) = lr * w(s) * d(s), with w(s) = 0.1 + 0.9 * min((s + 1) / warmup, 1) (1 without warm-up) and
d(s) = 0.1 if s >= num_steps_before_decay else 1, where s is the 0-based optimizer step about to be taken.
Implemented as a `LambdaLR` whose factor is a small picklable object, so the scheduler state_dict is plain
numbers (loadable with `torch.load(weights_only=True)`) and resume restores it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

WARMUP_START_FRACTION = 0.1
DECAY_GAMMA = 0.1


@dataclass
class WarmupStepDecay:
    """Multiplicative lr factor for 0-based step `s` (see module docstring)."""

    warmup_steps: int
    decay_step: int

    def __call__(self, step: int) -> float:
        warm = 1.0
        if self.warmup_steps > 0:
            warm = WARMUP_START_FRACTION + (1.0 - WARMUP_START_FRACTION) * min((step + 1) / self.warmup_steps, 1.0)
        return warm * (DECAY_GAMMA if step >= self.decay_step else 1.0)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, num_steps_before_decay: int
                       ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `WarmupStepDecay`; call `.step()` once after every optimizer step (skipped ones too)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupStepDecay(warmup_steps, num_steps_before_decay))
