"""`--retention_method align | consft | ki` in the fine-tuning loop: drop-ins of `plain_gradients` with global metrics.

The gradient functions live with their losses (`align_loss.align_gradients`, `consft.consft_gradients`,
`knowledge_insulation.ki_gradients`); this module binds them to the flags, turns their per-rank numbers into logged
(rank-averaged) metrics and holds the state a resume needs (Align's frozen projector P and teacher fingerprint;
ConSFT is stateless; KI its weight and vocabulary size, checked on resume). See docs/BASELINES.md.
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


class KIMethod:
    """Knowledge insulation (prismatic/training/knowledge_insulation.py). Logs `KI/Token CE`, `KI/Token Accuracy`,
    `KI/Total Loss`; the head's L1 stays under the usual `VLA Train/*` keys."""

    name = "ki"

    def __init__(self, cfg: Any, policy: nn.Module, env: DistEnv, saved_state: Mapping[str, Any] | None) -> None:
        from prismatic.cli_errors import UserError
        from prismatic.models.modeling_vla import unwrap_vla
        from prismatic.training.knowledge_insulation import check_action_vocabulary

        self.env, self.weight = env, float(cfg.ki_action_loss_weight)
        self.vocab_size = int(policy.processor.tokenizer.vocab_size)
        config = unwrap_vla(policy.vla).config
        try:
            check_action_vocabulary(self.vocab_size, int(config.text_config.vocab_size), config.stop_token_id)
        except ValueError as err:
            raise UserError(str(err), "use a model whose tokenizer has >= 256 regular ids inside its LM head, or "
                            "another --retention_method") from None
        if saved_state is not None:
            self.load_state_dict(saved_state)

    def compute_gradients(self, model: nn.Module, micro_batches: Sequence[MicroBatch], device: torch.device) -> dict:
        from prismatic.training.knowledge_insulation import ki_gradients

        local = ki_gradients(model, micro_batches, device, self.weight, self.vocab_size)
        ce, accuracy, total = _global([local["token_ce"], local["token_accuracy"], local["total_loss"]], self.env)
        local["metrics"] = {"KI/Token CE": ce, "KI/Token Accuracy": accuracy, "KI/Total Loss": total}
        return local

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.name, "weight": self.weight, "vocab_size": self.vocab_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from prismatic.cli_errors import UserError

        if state.get("method") != self.name:
            raise ValueError(f"the checkpoint was trained with --retention_method {state.get('method')}, not ki")
        if float(state["weight"]) != self.weight or int(state["vocab_size"]) != self.vocab_size:
            raise UserError(f"the checkpoint was trained with --ki_action_loss_weight {state['weight']} and "
                            f"{state['vocab_size']} tokenizer ids, not {self.weight} and {self.vocab_size}",
                            f"resume with --ki_action_loss_weight {state['weight']} (or start a new run)")
