"""Named sets of CRaFT dual flags measured in docs/CRAFT.md ("Does a rule spend the budget?"), as FinetuneConfig
overrides, so scripts (vla-scripts/dual_budget.py, the study grids) run exactly the measured settings.

NUPI_FLAGS         the νPI rule chosen before the AdamW remedy (plain AdamW; misses the goal on 2 of 3 seeds)
NEW_RULE_FLAGS     the rule chosen with --craft_adam_second_moment action (issue 26, item 2; see docs/CRAFT.md)

Chosen on `make demo`'s toy setting (ε 0.02, 60 steps, seeds 7/8/9): a starting point, not a tuned default.
"""

from __future__ import annotations

NUPI_FLAGS: dict[str, object] = {
    "craft_dual_mode": "nupi", "craft_dual_log_error": True, "craft_dual_setpoint": 0.8, "craft_dual_lr": 0.1,
    "craft_dual_kp": 0.5, "craft_dual_nu": 0.9, "craft_max_lambda": 1.5,
}

NEW_RULE_FLAGS: dict[str, object] = {**NUPI_FLAGS, "craft_adam_second_moment": "action"}
