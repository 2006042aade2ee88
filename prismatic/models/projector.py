"""Fused GELU MLP projector from the fused vision features to the LLM width (Prismatic "fused-gelu-mlp")."""

from __future__ import annotations

import torch
from torch import nn

PROJECTOR_WIDTH_RATIO = 4  # fc1 is 4x the vision width (2176 -> 8704 for the released model)


class FusedMLPProjector(nn.Module):
    """fc1 (Dv -> 4 Dv), GELU, fc2 (4 Dv -> D), GELU, fc3 (D -> D)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        inner = PROJECTOR_WIDTH_RATIO * vision_dim
        self.fc1 = nn.Linear(vision_dim, inner)
        self.fc2 = nn.Linear(inner, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(patches)))))
