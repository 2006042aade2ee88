"""The CRaFT rule on bf16 parameters: the gradient surgery's scalars are accumulated in float64 and its arithmetic in
float32 whatever the parameter dtype, so it matches a float64 reference computed from the same bf16 gradients up to
the final rounding to bf16 (one bf16 ulp), and the fp64 model's rule within bf16 tolerance."""

from __future__ import annotations

import copy

import torch
from torch import nn

from prismatic.training.craft_utils import CRaFTGradientProjector

D = 512  # 512 x 512 trunk: 262k elements per dot product, where a bf16 running sum loses several digits


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(D, D)        # reached by both losses (buffered, surgery)
        self.act_head = nn.Linear(D, 4)     # reached by L_act only (straight into .grad)
        self.ret_head = nn.Linear(D, 4, bias=False)  # frozen target of L_ret
        self.ret_head.requires_grad_(False)

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.trunk(x))
        act = self.act_head(h)
        loss_act = act.float().pow(2).mean()
        # partly the opposite of L_act through the trunk: the gradients conflict and the projection fires
        loss_ret = self.ret_head(h).float().pow(2).mean() - 0.5 * act.float().pow(2).mean()
        return loss_act, loss_ret


def _rule64(g_act: list[torch.Tensor], g_ret: list[torch.Tensor | None], lam: float, delta: float):
    dot = sum((a.double() * r.double()).sum() for a, r in zip(g_act, g_ret, strict=True) if r is not None)
    nr2 = sum((r.double() ** 2).sum() for r in g_ret if r is not None)
    c = min(0.0, float(dot)) / (float(nr2) + delta)
    g = [a.double() + ((lam - c) * r.double() if r is not None else 0.0) for a, r in zip(g_act, g_ret, strict=True)]
    return g, float(dot), float(nr2), c


def test_bf16_rule_matches_fp64_reference():
    torch.manual_seed(0)
    model32 = TwoHeads()
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    x = torch.randn(16, D)
    lam, delta = 0.7, 1e-12
    named = [(n, p) for n, p in model16.named_parameters() if p.requires_grad]
    params = [p for _, p in named]

    # the bf16 gradients themselves (autograd on the bf16 graph), then the fp64 rule on them
    la, lr = model16.losses(x.to(torch.bfloat16))
    g_act = list(torch.autograd.grad(la, params, retain_graph=True))
    g_ret = [g for g in torch.autograd.grad(lr, params, allow_unused=True)]
    assert all(g.dtype == torch.bfloat16 for g in g_act)
    ref, dot, nr2, c = _rule64(g_act, g_ret, lam, delta)
    assert c < 0  # conflicting: the projection is part of what is checked

    projector = CRaFTGradientProjector(named, delta=delta, enable_projection=True)
    la, lr = model16.losses(x.to(torch.bfloat16))
    projector.accumulate(la, lr)
    stats = projector.step(lam)
    assert stats["projection_fired"] == 1.0
    # scalars: float64 sums of bf16 values (exact in float32 buffers): agree to float64 rounding
    assert abs(stats["dot"] - dot) <= 1e-9 * abs(dot)
    assert abs(stats["grad_norm_ret"] ** 2 - nr2) <= 1e-9 * nr2
    assert abs(stats["projection_coef"] - c) <= 1e-9 * abs(c)
    # a running bf16 sum would not: the test discriminates the accumulator's precision
    a16 = sum((a * r).sum() for a, r in zip(g_act, g_ret, strict=True) if r is not None)
    assert abs(float(a16) - dot) > 1e-4 * abs(dot)
    for (name, p), g64 in zip(named, ref, strict=True):
        assert p.grad.dtype == torch.bfloat16, name
        err = (p.grad.double() - g64).abs()
        assert bool((err <= 2.0 ** -8 * g64.abs() + 1e-30).all()), f"{name}: {float(err.max())}"  # one bf16 rounding

    # and the fp64 model's rule (fp64 forward and gradients) within bf16 tolerance
    model64 = model32.double()
    p64 = [p for p in model64.parameters() if p.requires_grad]
    la, lr = model64.losses(x.double())
    g_act64 = list(torch.autograd.grad(la, p64, retain_graph=True))
    g_ret64 = list(torch.autograd.grad(lr, p64, allow_unused=True))
    ref64, dot64, _, c64 = _rule64(g_act64, g_ret64, lam, delta)
    assert abs(stats["projection_coef"] - c64) <= 0.05 * abs(c64)
    for (name, p), g in zip(named, ref64, strict=True):
        rel = float((p.grad.double() - g).norm() / g.norm())
        assert rel < 0.05, f"{name}: relative error {rel:.3g} vs the fp64 model"
