"""Per-group size of each optimizer update and of AdamW's second moments (`--log_update_norms True`).

Why: CRaFT's combined gradient g_act + (λ - c) g_ret can be far larger than g_act, and AdamW divides every later update
by √v̂, its running second moment (β2 = 0.999: a memory of ~1000 steps). These metrics make that interaction visible:

    VLA Train/Update Norm <group>   ||θ_after - θ_before|| over the group's trainable tensors (0 for a skipped update)
    VLA Train/Adam sqrt(v) <group>  mean over the group's elements of √v̂ = √(v / (1 - β2^t)) after the step

Groups by parameter name: llm_lora, vision_lora, projector, action_queries, action_head, proprio_projector, other.
Costs one copy of the trainable parameters per step (small with LoRA); a diagnostic, off by default.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

GROUPS = ("llm_lora", "vision_lora", "projector", "action_queries", "action_head", "proprio_projector", "other")
UPDATE_KEY = "VLA Train/Update Norm {}"
ADAM_KEY = "VLA Train/Adam sqrt(v) {}"


def param_group(name: str) -> str:
    """The group of a parameter name (DDP / peft prefixes allowed)."""
    if "action_queries" in name:
        return "action_queries"
    if name.startswith(("action_head", "module.action_head")):
        return "action_head"
    if "proprio_projector" in name:
        return "proprio_projector"
    if "language_model" in name:
        return "llm_lora"
    if "vision_backbone" in name:
        return "vision_lora"
    if ".projector." in f".{name}":
        return "projector"
    return "other"


class UpdateNormMeter:
    """`before()` just before `optimizer.step()`, `after(optimizer)` just after it -> the metrics of that step."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]]) -> None:
        self.items = [(param_group(n), p) for n, p in named_params if p.requires_grad]
        if not self.items:
            raise ValueError("UpdateNormMeter needs at least one trainable parameter")
        self.groups = [g for g in GROUPS if any(group == g for group, _ in self.items)]
        self._before: list[torch.Tensor] | None = None

    @torch.no_grad()
    def before(self) -> None:
        self._before = [p.detach().to(torch.float32, copy=True) for _, p in self.items]

    @torch.no_grad()
    def after(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        if self._before is None:
            raise RuntimeError("UpdateNormMeter.after() without before()")
        sq = dict.fromkeys(self.groups, 0.0)
        v_sum, v_count = dict.fromkeys(self.groups, 0.0), dict.fromkeys(self.groups, 0)
        betas = {id(p): group["betas"][1] for group in optimizer.param_groups for p in group["params"]}
        for (group, p), old in zip(self.items, self._before, strict=True):
            sq[group] += float((p.detach().to(torch.float32) - old).double().pow(2).sum())
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" in state:
                step = float(state["step"])
                v_hat = state["exp_avg_sq"].double() / (1.0 - betas[id(p)] ** step)
                v_sum[group] += float(v_hat.sqrt().sum())
            v_count[group] += p.numel()
        self._before = None
        metrics = {UPDATE_KEY.format(g): math.sqrt(sq[g]) for g in self.groups}
        metrics.update({ADAM_KEY.format(g): v_sum[g] / v_count[g] for g in self.groups})
        return metrics
