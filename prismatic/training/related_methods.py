"""`--retention_method align | consft` in the fine-tuning loop: drop-ins of `plain_gradients` with global metrics.

The gradient functions live with their losses (`align_loss.align_gradients`, `consft.consft_gradients`); this module
binds them to the flags, turns their per-rank numbers into logged (rank-averaged) metrics and holds the state a
resume needs (Align's frozen projector P and teacher fingerprint; ConSFT is stateless). See docs/BASELINES.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prismatic.training.distributed import DistEnv, all_reduce_mean
from prismatic.training.train_step import MicroBatch


def _global(values: Sequence[torch.Tensor], env: DistEnv) -> list[float]:
    stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()) for v in values])
    mean = all_reduce_mean(stacked.to(env.device if env.device.type == "cuda" else "cpu"), env).cpu()
    return [float(x) for x in mean]


def _global_extreme(value: torch.Tensor, env: DistEnv, op: str) -> float:
    t = torch.as_tensor(value, dtype=torch.float64).reshape(1).clone()
    if env.distributed:
        t = t.to(env.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN if op == "min"
                                     else torch.distributed.ReduceOp.MAX)
    return float(t.cpu()[0])


class AlignMethod:
    """Align: L = L_act + w · L_align (prismatic/training/align_loss.py). Logs `Align/Loss`, `Align/Cosine`."""

    name = "align"

    def __init__(self, cfg: Any, policy: nn.Module, env: DistEnv, saved_state: Mapping[str, Any] | None) -> None:
        from prismatic.training.align_loss import AlignRetention

        self.env = env
        self.is_lora = hasattr(policy.vla, "peft_config")
        self.align = AlignRetention(policy.vla, layer=cfg.align_layer, weight=cfg.align_weight,
                                    teacher=cfg.align_teacher, seed=cfg.seed)
        if saved_state is not None:
            self.load_state_dict(saved_state)

    def compute_gradients(self, model: nn.Module, micro_batches: Sequence[MicroBatch], device: torch.device) -> dict:
        from prismatic.training.align_loss import align_gradients

        local = align_gradients(model, micro_batches, device, self.align)
        align_loss, total = _global([local["align_loss"], local["total_loss"]], self.env)
        local["metrics"] = {"Align/Loss": align_loss, "Align/Cosine": -align_loss, "Align/Total Loss": total}
        return local

    def state_dict(self) -> dict[str, Any]:
        # under LoRA the teacher is the base backbone, rebuilt on resume (its fingerprint is checked)
        return {"method": self.name, "align": self.align.state_dict(include_teacher=not self.is_lora)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"the checkpoint was trained with --retention_method {state.get('method')}, not align")
        self.align.load_state_dict(dict(state["align"]))


class ConSFTMethod:
    """ConSFT (this project's reading, prismatic/training/consft.py). Logs `ConSFT/...` weights and the loss."""

    name = "consft"

    def __init__(self, cfg: Any, env: DistEnv) -> None:
        self.env, self.tau, self.clip = env, float(cfg.consft_tau), float(cfg.consft_clip)

    def compute_gradients(self, model: nn.Module, micro_batches: Sequence[MicroBatch], device: torch.device) -> dict:
        from prismatic.training.consft import consft_gradients

        local = consft_gradients(model, micro_batches, device, self.tau, self.clip)
        loss, mean, clipped = _global([local["consft_loss"], local["weight_mean"], local["clipped_fraction"]],
                                      self.env)
        local["metrics"] = {"ConSFT/Loss": loss, "ConSFT/Weight Mean": mean,
                            "ConSFT/Weight Min": _global_extreme(local["weight_min"], self.env, "min"),
                            "ConSFT/Weight Max": _global_extreme(local["weight_max"], self.env, "max"),
                            "ConSFT/Clipped Fraction": clipped}
        return local

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "tau": self.tau, "clip": self.clip}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("method") != self.name:
            raise ValueError(f"the checkpoint was trained with --retention_method {state.get('method')}, not consft")
