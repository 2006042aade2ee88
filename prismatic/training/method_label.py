"""The method label of a training run, one vocabulary for the tables, wandb and the dashboard.

`method_label(config)` names what a resolved training config runs: `baseline` (plain SFT), `align`, `consft`,
`ki` (`ki-w<weight>` off the default weight 1: w = 0 is the stop-gradient-only ablation, a row of its own),
`freeze`, `craft`, or `craft-<variant parts>` for a CRaFT run off the defaults (`craft-noproj`, `craft-fixlam0.1`,
`craft-eps0.05`, `craft-m6`, `craft-offline`, ...), `+freeze` when the vision backbone is frozen besides. The grid's
run ids use the same labels (tests/experiments: every ablation variant's label equals its run id part).
"""

from __future__ import annotations

import math
from typing import Any

# LLM depth per model preset: the default anchor layers are m = L // 2 and M = L (finetune.py's defaults).
PRESET_LLM_LAYERS = {"real": 24, "tiny": 4}
CRAFT_DEFAULTS = {"craft_retention_budget": 0.1, "craft_dual_lr": 0.01, "craft_anchor_type": "concat",
                  "craft_anchor_source": "online"}


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _num(value: Any) -> str:
    return f"{float(value):g}"


def method_label(config: dict) -> str:
    """baseline | craft | craft-<variant parts> | align | consft | ki[-w<weight>] | freeze ..., from the resolved
    training config."""
    retention = str(config.get("retention_method") or "none").lower()
    use_craft = _as_bool(config.get("use_craft", False)) or retention == "craft"
    freeze = _as_bool(config.get("freeze_vision_backbone", False))
    if not use_craft:
        label = retention if retention not in ("none", "craft") else ("freeze" if freeze else "baseline")
        ki_weight = config.get("ki_action_loss_weight", 1.0)
        if retention == "ki" and ki_weight is not None and not math.isclose(float(ki_weight), 1.0):
            label += f"-w{_num(ki_weight)}"
        if freeze and label != "freeze":
            label += "+freeze"
        return label
    parts = []
    if not _as_bool(config.get("craft_enable_projection", True)):
        parts.append("noproj")
    if not _as_bool(config.get("craft_enable_dual", True)):
        fixed = config.get("craft_fixed_lambda")
        parts.append(f"fixlam{_num(fixed if fixed is not None else config.get('craft_init_lambda', 0.0))}")
    anchor = config.get("craft_anchor_type", "concat")
    if anchor != CRAFT_DEFAULTS["craft_anchor_type"]:
        parts.append(f"anchor_{anchor}")
    budget = config.get("craft_retention_budget", 0.1)
    if not math.isclose(float(budget), CRAFT_DEFAULTS["craft_retention_budget"]):
        parts.append(f"eps{_num(budget)}")
    dual_lr = config.get("craft_dual_lr", 0.01)
    if not math.isclose(float(dual_lr), CRAFT_DEFAULTS["craft_dual_lr"]):
        parts.append(f"dlr{_num(dual_lr)}")
    depth = PRESET_LLM_LAYERS.get(str(config.get("model_preset", "real")))
    raw, aq = config.get("craft_raw_layer"), config.get("craft_aq_layer")
    if raw is not None and (depth is None or int(raw) != depth // 2):
        parts.append(f"m{raw}")
    if aq is not None and (depth is None or int(aq) != depth):
        parts.append(f"M{aq}")
    if config.get("craft_anchor_source", "online") != CRAFT_DEFAULTS["craft_anchor_source"]:
        parts.append(str(config.get("craft_anchor_source")))
    if config.get("craft_snapshot_path"):
        parts.append("snapshot")
    mode = str(config.get("craft_dual_mode") or "gradient")
    if mode != "gradient":
        parts.append(mode)
    if _as_bool(config.get("craft_dual_normalize", False)):
        parts.append("norm")
    if config.get("craft_max_lambda") is not None:
        parts.append(f"maxlam{_num(config['craft_max_lambda'])}")
    label = "-".join(["craft", *parts])
    return label + ("+freeze" if freeze else "")
