"""ProprioProjector: maps the normalised robot state (8 dims for LIBERO) to one LLM-width token for the head."""

from __future__ import annotations

import torch
from torch import nn

PROPRIO_DIM = 8


class ProprioProjector(nn.Module):
    """fc1 (proprio_dim -> D), GELU, fc2 (D -> D). Input (B, proprio_dim) -> (B, D)."""

    def __init__(self, llm_dim: int, proprio_dim: int = PROPRIO_DIM) -> None:
        super().__init__()
        self.proprio_dim = proprio_dim
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)
        self.act = nn.GELU()

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        if proprio.shape[-1] != self.proprio_dim:
            raise ValueError(f"proprio must have {self.proprio_dim} dims in its last axis, got shape "
                             f"{tuple(proprio.shape)}")
        return self.fc2(self.act(self.fc1(proprio)))
