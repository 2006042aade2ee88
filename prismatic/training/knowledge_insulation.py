"""Knowledge insulation (KI, Driess et al. 2025, arXiv 2505.23705), the `--retention_method ki` baseline.

Per micro-batch, ONE forward of the policy with the chunk's discretised actions appended after the stop token
(prismatic.models.action_tokens; layout in prismatic.models.sequence_layout):

    L = L_act(head(sg(Raw Latents), sg(ActionQuery latents), proprio))  +  w · CE(LM head logits, action token ids)

- sg = stop-gradient (`VLAPolicy.forward(insulate=True)`): L_act trains the action head and the proprio projector only;
- the VLA (its LoRA adapters, or every weight with full fine-tuning, and the ActionQuery embeddings) gets the token
  cross-entropy's gradient only, teacher-forced next-token prediction over the LLM's whole vocabulary;
- w = `--ki_action_loss_weight` (default 1). w = 0 is the pure stop-gradient ablation: the VLA runs without autograd,
  gets no gradient at all (grad None, so AdamW's weight decay does not touch it either) and stays at θ0.

CE is the mean over the micro-batch's B · N tokens; every sample holds the same N = chunk · action_dim tokens, so k
micro-batches of b (or 2 ranks of b) average to exactly one batch of k · b, as the L1 loss does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from prismatic.models.action_tokens import ACTION_TOKEN_BINS, action_token_ids


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE in float32, top-1 accuracy) of logits (B, N, V) against target ids (B, N)."""
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits must be (B, N, V) and targets (B, N); got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")
    flat = logits.float().reshape(-1, logits.shape[-1])
    target = targets.reshape(-1).to(flat.device)
    ce = F.cross_entropy(flat, target)
    accuracy = (flat.detach().argmax(dim=-1) == target).float().mean()
    return ce, accuracy


def check_action_vocabulary(vocab_size: int, embedding_rows: int, stop_token_id: int | None) -> None:
    """The last ACTION_TOKEN_BINS ids of the tokenizer's vocabulary must exist in the LM head and not be the stop
    token (ValueError otherwise)."""
    if not ACTION_TOKEN_BINS <= vocab_size <= embedding_rows:
        raise ValueError(f"--retention_method ki maps {ACTION_TOKEN_BINS} action bins onto the last ids of the "
                         f"tokenizer's vocabulary ({vocab_size} ids), which must fit the LM head's {embedding_rows} "
                         "rows")
    if stop_token_id is not None and vocab_size - ACTION_TOKEN_BINS <= stop_token_id < vocab_size:
        raise ValueError(f"the stop token id {stop_token_id} is one of the action-token ids "
                         f"{vocab_size - ACTION_TOKEN_BINS}..{vocab_size - 1}")


def ki_gradients(model: torch.nn.Module, micro_batches: Sequence, device: torch.device, weight: float,
                 vocab_size: int) -> dict:
    """Drop-in for `train_step.plain_gradients` under `--retention_method ki` (see the module docstring).

    Returns this rank's means over micro-batches: `loss` / `curr_l1` / `next_l1` (the head's L1), `token_ce`,
    `token_accuracy` and `total_loss` (L1 + w · CE), float64 tensors.
    """
    from prismatic.training.train_step import plain_gradients  # local: no import cycle

    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"ki action loss weight must be a finite number >= 0, got {weight}")
    train_vla = weight > 0

    def targets(micro) -> torch.Tensor:
        return action_token_ids(micro.batch["actions"], vocab_size).to(device)

    def forward_kwargs(micro) -> dict:
        return {"action_token_ids": targets(micro), "insulate": True, "vla_grad": train_vla}

    def objective(l1: torch.Tensor, out, micro) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ce, accuracy = token_cross_entropy(out.vla_output.action_token_logits, targets(micro))
        total = l1 + weight * ce if train_vla else l1
        return total, {"token_ce": ce, "token_accuracy": accuracy, "total_loss": l1.detach() + weight * ce.detach()}

    return plain_gradients(model, micro_batches, device, objective, forward_kwargs)
