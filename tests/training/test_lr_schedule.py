"""The warm-up + step-decay schedule against the closed-form formula."""

from __future__ import annotations

import pytest
import torch

from prismatic.training.lr_schedule import build_lr_scheduler


@pytest.mark.parametrize("warmup, decay", [(0, 5), (4, 6), (3, 2)])
def test_lr_follows_formula_and_resumes(warmup, decay):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=0.5)
    sched = build_lr_scheduler(opt, warmup, decay)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = []
    for s in range(10):
        warm = 1.0 if warmup == 0 else 0.1 + 0.9 * min((s + 1) / warmup, 1.0)
        expected.append(0.5 * warm * (0.1 if s >= decay else 1.0))
    assert seen == pytest.approx(expected, rel=1e-12)

    # A fresh scheduler loaded from the state dict continues with the same lr.
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched2 = build_lr_scheduler(opt2, warmup, decay)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]  # the optimizer state_dict carries it in training
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
