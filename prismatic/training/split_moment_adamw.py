"""AdamW whose second moment may be fed a different gradient than its first (`--craft_adam_second_moment action`).

Why (issue 26, item 2): CRaFT steps on g = g_act' + λ g_ret (g_act' = the projected action gradient). Plain AdamW
divides by √v̂ of g itself, so a large λ g_ret inflates v̂ and normalises λ away: L_ret stops following λ's size. Here
the first moment m takes the full combined gradient while v is updated with the action part g_act' only, so λ g_ret
is measured in units of the action gradient's scale and λ means what it says.

Per parameter p with gradient g (`p.grad`) and second-moment gradient u (`set_second_moment_grads`, default u = g):

    t ← t + 1
    p ← p (1 − lr·wd)                        decoupled weight decay
    m ← β1 m + (1 − β1) g
    v ← β2 v + (1 − β2) u²
    p ← p − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)

These are torch.optim.AdamW's formulas (amsgrad off, maximize off); with u = g the update equals it to rounding.
State keys `step` (a float32 scalar tensor, as torch's), `exp_avg`, `exp_avg_sq`, so checkpoints, resume and
`update_norms.py` read it like torch's AdamW. Works on DTensor (FSDP2) parameters: u must then be a DTensor laid out as
the parameter (the projector hands over exactly that).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn


class SplitMomentAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable[nn.Parameter] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self._second_moment_grads: dict[int, torch.Tensor] = {}

    def set_second_moment_grads(self, grads: Mapping[nn.Parameter, torch.Tensor]) -> None:
        """The gradients v takes at the next `step()` (parameters missing here use their `.grad`). Replaces what an
        earlier call set; `step()` consumes them."""
        self._second_moment_grads = {id(p): g for p, g in grads.items()}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 (torch's Optimizer.step signature)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        second, self._second_moment_grads = self._second_moment_grads, {}
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("SplitMomentAdamW does not support sparse gradients")
                u = second.get(id(p), grad)
                if u.shape != grad.shape:
                    raise ValueError(f"second-moment gradient shape {tuple(u.shape)} != gradient shape "
                                     f"{tuple(grad.shape)}")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
                step_t += 1
                step = float(step_t)
                p.mul_(1.0 - lr * wd)
                exp_avg.lerp_(grad, 1.0 - beta1)
                u = u.to(exp_avg_sq.dtype)
                exp_avg_sq.mul_(beta2).addcmul_(u, u, value=1.0 - beta2)
                step_size = lr / (1.0 - beta1**step)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size)
        return loss
