"""Tiny models shared by the CRaFT tests (single-process and torchrun scripts)."""

from __future__ import annotations

import torch
from torch import nn


class ToyPolicy(nn.Module):
    """trunk (reached by both losses) -> features; act_head (reached by L_act only); `unused` (reached by neither)."""

    def __init__(self, d_in: int = 6, d_hidden: int = 8, d_feat: int = 5, d_out: int = 3) -> None:
        super().__init__()
        self.trunk1 = nn.Linear(d_in, d_hidden)
        self.trunk2 = nn.Linear(d_hidden, d_feat)
        self.act_head = nn.Linear(d_feat, d_out)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk2(torch.tanh(self.trunk1(x)))
        return feats, self.act_head(torch.tanh(feats))


def toy_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, anchors: torch.Tensor):
    """L_act = mean L1 (like VLA-Adapter), L_ret = mean over samples of sum over dims squared difference."""
    feats, pred = model(x)
    loss_act = (pred - y).abs().mean()
    loss_ret = (feats - anchors).pow(2).sum(-1).mean()
    return loss_act, loss_ret


def toy_data(n: int, seed: int = 0, d_in: int = 6, d_feat: int = 5, d_out: int = 3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g),
            torch.randn(n, d_feat, generator=g))
