"""--craft_retention_every k at the projector: g_ret kept from a refresh step and reused by the steps in between.

Independent computation: per-loss gradients by plain autograd.grad on the toy policy, then the rule
g = g_act + (λ - c) g_ret, c = min(0, <g_act, g_ret>) / (||g_ret||² + δ) written out in float64 numpy, with g_ret the
one of the refresh step and g_act the current step's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from craft_toy_models import ToyPolicy, toy_data, toy_losses

from prismatic.training.craft_utils import CRaFTGradientProjector

DELTA, LAM = 1e-8, 0.3


def _per_loss_grads(model, x, y, anchors, push):
    """float64 numpy g_act, g_ret per parameter (zeros where a loss does not reach)."""
    params = list(model.parameters())
    la, lr = toy_losses(model, x, y, anchors)
    la = la - push * lr  # push > 0 turns g_act against g_ret: the projection fires
    ga = torch.autograd.grad(la, params, retain_graph=True, allow_unused=True)
    gr = torch.autograd.grad(lr, params, allow_unused=True)
    z = [np.zeros(tuple(p.shape)) for p in params]
    return ([z[i] if g is None else g.double().numpy() for i, g in enumerate(ga)],
            [z[i] if g is None else g.double().numpy() for i, g in enumerate(gr)])


def _rule(ga, gr, lam):
    dot = sum(float((a * r).sum()) for a, r in zip(ga, gr, strict=True))
    nr2 = sum(float((r * r).sum()) for r in gr)
    c = min(0.0, dot) / (nr2 + DELTA)
    return [a + (lam - c) * r for a, r in zip(ga, gr, strict=True)], c


def _accumulate(proj, model, x, y, anchors, push, micro, reuse):
    for xb, yb, ab in zip(x.chunk(micro), y.chunk(micro), anchors.chunk(micro), strict=True):
        la, lr = toy_losses(model, xb, yb, ab)
        la = la - push * lr
        if reuse:
            proj.accumulate_act(la / micro)
        else:
            proj.accumulate(la / micro, lr / micro)


def _move(model, seed):
    """Stand-in for the optimizer step between the two steps (θ changes, so g_act and g_ret change)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            p.grad = None


@pytest.mark.parametrize("push", [0.0, 3.0], ids=["no_conflict", "conflict"])
def test_in_between_step_projects_the_new_g_act_against_the_kept_g_ret(push):
    torch.manual_seed(0)
    model = ToyPolicy()
    proj = CRaFTGradientProjector(list(model.named_parameters()), delta=DELTA)
    x0, y0, a0 = toy_data(4, seed=1)
    x1, y1, a1 = toy_data(4, seed=2)
    x2, y2, a2 = toy_data(4, seed=3)
    # step 0 (refresh, k = 2): the exact step; keep g_ret for step 1
    _, gr0 = _per_loss_grads(model, x0, y0, a0, push)
    _accumulate(proj, model, x0, y0, a0, push, micro=2, reuse=False)
    proj.keep_ret = True
    proj.step(LAM)
    _move(model, seed=5)
    # step 1 (reuse): only L_act's backward; g_ret is step 0's
    ga1, gr1 = _per_loss_grads(model, x1, y1, a1, push)
    _accumulate(proj, model, x1, y1, a1, push, micro=2, reuse=True)
    proj.keep_ret = False  # step 2 refreshes
    stats = proj.step(LAM)
    want, c = _rule(ga1, gr0, LAM)
    assert (c < 0) == (push > 0) and stats["projection_coef"] == pytest.approx(c, rel=1e-5)
    assert not np.allclose(gr0[0], gr1[0])  # the kept g_ret really is another one than the current step's
    for (name, p), w in zip(model.named_parameters(), want, strict=True):
        if name.startswith("unused"):
            assert p.grad is None
            continue
        np.testing.assert_allclose(p.grad.double().numpy(), w, rtol=1e-5, atol=1e-7, err_msg=name)
    _move(model, seed=6)
    # step 2 (refresh): g_ret computed anew, nothing of the kept one left in the buffer
    ga2, gr2 = _per_loss_grads(model, x2, y2, a2, push)
    _accumulate(proj, model, x2, y2, a2, push, micro=1, reuse=False)
    proj.step(LAM)
    want, _ = _rule(ga2, gr2, LAM)
    for (name, p), w in zip(model.named_parameters(), want, strict=True):
        if not name.startswith("unused"):
            np.testing.assert_allclose(p.grad.double().numpy(), w, rtol=1e-5, atol=1e-7, err_msg=name)


def test_kept_g_ret_survives_a_state_round_trip_bit_for_bit():
    """kept_ret_state -> load_kept_ret on a fresh projector (a resume): the reused step's .grad is identical."""
    torch.manual_seed(0)
    model = ToyPolicy()
    x0, y0, a0 = toy_data(4, seed=1)
    x1, y1, a1 = toy_data(4, seed=2)
    proj = CRaFTGradientProjector(list(model.named_parameters()), delta=DELTA)
    _accumulate(proj, model, x0, y0, a0, 3.0, micro=1, reuse=False)
    proj.keep_ret = True
    proj.step(LAM)
    saved = proj.kept_ret_state()
    model.zero_grad(set_to_none=True)
    resumed = CRaFTGradientProjector(list(model.named_parameters()), delta=DELTA)
    resumed.load_kept_ret(saved)
    grads = {}
    for p_obj in (proj, resumed):
        _accumulate(p_obj, model, x1, y1, a1, 3.0, micro=1, reuse=True)
        p_obj.step(LAM)
        grads[id(p_obj)] = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
    for a, b in zip(grads[id(proj)], grads[id(resumed)], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert saved["ret"] == ["trunk1.weight", "trunk1.bias", "trunk2.weight", "trunk2.bias"]
    assert saved["act_only"] == ["act_head.weight", "act_head.bias"]


def test_reuse_without_a_kept_g_ret_is_an_error():
    model = ToyPolicy()
    x, y, a = toy_data(2, seed=1)
    proj = CRaFTGradientProjector(list(model.named_parameters()), delta=DELTA)
    la, _ = toy_losses(model, x, y, a)
    with pytest.raises(RuntimeError, match="no kept g_ret"):
        proj.accumulate_act(la)
    la, lr = toy_losses(model, x, y, a)
    proj.accumulate(la, lr)
    proj.step(LAM)  # keep_ret False: the next step must refresh
    la, _ = toy_losses(model, x, y, a)
    with pytest.raises(RuntimeError, match="no kept g_ret"):
        proj.accumulate_act(la)
