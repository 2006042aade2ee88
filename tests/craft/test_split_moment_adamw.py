"""SplitMomentAdamW (--craft_adam_second_moment action) against a hand-written numpy AdamW and torch's AdamW, and the
projector's hand-over of the action part g_act - c g_ret (the combined gradient minus λ g_ret)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from prismatic.training.craft_utils import CRaFTGradientProjector
from prismatic.training.split_moment_adamw import SplitMomentAdamW

SHAPES = [(3, 4), (5,)]


def _numpy_adamw(p0, grads, v_grads, lr, betas, eps, weight_decay):
    """AdamW as written in Loshchilov & Hutter / torch's docs, float64, with v fed `v_grads`."""
    b1, b2 = betas
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, (g, u) in enumerate(zip(grads, v_grads, strict=True), start=1):
        p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * u * u
        p = p - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
    return p, m, v


def _run(opt_cls, p0s, grads, v_grads=None, **kw):
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in p0s]
    opt = opt_cls(params, **kw)
    for step, gs in enumerate(grads):
        for p, g in zip(params, gs, strict=True):
            p.grad = torch.tensor(g, dtype=torch.float64)
        if v_grads is not None:
            opt.set_second_moment_grads({params[0]: torch.tensor(v_grads[step], dtype=torch.float64)})
        opt.step()
    return params, opt


def test_separate_v_gradient_matches_numpy_adamw():
    rng = np.random.default_rng(0)
    p0s = [rng.standard_normal(s) for s in SHAPES]
    steps = 6
    grads = [[rng.standard_normal(s) for s in SHAPES] for _ in range(steps)]
    v_grads = [0.1 * rng.standard_normal(SHAPES[0]) for _ in range(steps)]  # only the first parameter gets one
    kw = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    params, opt = _run(SplitMomentAdamW, p0s, grads, v_grads, **kw)
    for i, p in enumerate(params):
        us = v_grads if i == 0 else [g[i] for g in grads]  # the second parameter: v takes its own gradient
        want_p, want_m, want_v = _numpy_adamw(p0s[i], [g[i] for g in grads], us, **kw)
        np.testing.assert_allclose(p.detach().numpy(), want_p, rtol=1e-12, atol=1e-14)
        state = opt.state[p]
        np.testing.assert_allclose(state["exp_avg"].numpy(), want_m, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state["exp_avg_sq"].numpy(), want_v, rtol=1e-12, atol=1e-16)
        assert float(state["step"]) == steps and state["step"].dtype == torch.float32
    # the separate v changed the result: the numpy AdamW fed the gradient itself lands elsewhere
    plain_p, _, _ = _numpy_adamw(p0s[0], [g[0] for g in grads], [g[0] for g in grads], **kw)
    assert np.abs(params[0].detach().numpy() - plain_p).max() > 1e-3
    # the v gradients are consumed by step(): the next step uses .grad again
    assert opt._second_moment_grads == {}


def test_without_v_gradient_equals_torch_adamw_and_loads_its_state():
    rng = np.random.default_rng(1)
    p0s = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in SHAPES] for _ in range(8)]
    mine, opt_m = _run(SplitMomentAdamW, p0s, grads, lr=1e-3)  # torch's defaults otherwise
    ref, opt_r = _run(torch.optim.AdamW, p0s, grads, lr=1e-3)
    for a, b in zip(mine, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(opt_m.state[a][key], opt_r.state[b][key], rtol=1e-12, atol=1e-15)
    # the same state layout: torch AdamW's state dict loads into SplitMomentAdamW and continues identically
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    opt_f = SplitMomentAdamW(fresh, lr=1e-3)
    opt_f.load_state_dict(copy.deepcopy(opt_r.state_dict()))  # (a same-dtype load shares the tensors)
    for opt, ps in ((opt_f, fresh), (opt_r, ref)):
        for p, g in zip(ps, grads[0], strict=True):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    for a, b in zip(fresh, ref, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12)


def test_lambda_g_ret_leaves_v_as_a_plain_run_on_the_action_gradients():
    """m takes g_act + λ g_ret, v only g_act: v equals that of AdamW run on g_act alone, whatever λ."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((4, 3))
    acts = [rng.standard_normal((4, 3)) for _ in range(5)]
    rets = [rng.standard_normal((4, 3)) for _ in range(5)]
    p_plain = torch.nn.Parameter(torch.tensor(p0))
    opt_plain = torch.optim.AdamW([p_plain], lr=1e-2)
    for lam in (0.5, 50.0):
        p = torch.nn.Parameter(torch.tensor(p0))
        opt = SplitMomentAdamW([p], lr=1e-2)
        for a, r in zip(acts, rets, strict=True):
            p.grad = torch.tensor(a + lam * r)
            opt.set_second_moment_grads({p: torch.tensor(a)})
            opt.step()
        if lam == 0.5:
            for a in acts:
                p_plain.grad = torch.tensor(a)
                opt_plain.step()
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], opt_plain.state[p_plain]["exp_avg_sq"],
                                   rtol=1e-12, atol=0)
        want_m = sum(0.1 * 0.9 ** (4 - t) * (a + lam * r) for t, (a, r) in enumerate(zip(acts, rets, strict=True)))
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), want_m, rtol=1e-12)


def test_bad_inputs():
    p = torch.nn.Parameter(torch.zeros(3))
    for kw, needle in ((dict(lr=-1.0), "learning rate"), (dict(betas=(0.9, 1.0)), "betas"), (dict(eps=-1.0), "eps"),
                       (dict(weight_decay=-0.1), "weight_decay")):
        with pytest.raises(ValueError, match=needle):
            SplitMomentAdamW([p], **kw)
    opt = SplitMomentAdamW([p])
    p.grad = torch.ones(3)
    opt.set_second_moment_grads({p: torch.ones(4)})
    with pytest.raises(ValueError, match=r"second-moment gradient shape \(4,\) != gradient shape \(3,\)"):
        opt.step()


@pytest.mark.parametrize("conflicting", [True, False])
def test_projector_hands_over_the_projected_action_part(conflicting):
    """action_grads() = g_act - c g_ret (numpy), = the written .grad - λ g_ret; the act-only parameter is left out
    (its gradient is its action part); without keep_action_part nothing is kept."""
    rng = np.random.default_rng(3)
    shapes = [(3, 4), (6,), (2,)]  # the last: reached by L_act only
    act = [rng.standard_normal(s) for s in shapes]
    ret = [rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1]), None]
    dot = sum(float(a.ravel() @ r.ravel()) for a, r in zip(act, ret, strict=False) if r is not None)
    if (dot < 0) != conflicting:
        ret = [None if r is None else -r for r in ret]
        dot = -dot
    lam, delta = 0.7, 1e-8
    nr2 = sum(float(r.ravel() @ r.ravel()) for r in ret if r is not None)
    c = min(0.0, dot) / (nr2 + delta)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    proj = CRaFTGradientProjector(params, delta=delta)
    proj.keep_action_part = True
    t = [torch.tensor(x, dtype=torch.float32) for x in act]
    proj.add_grads(t, [None if r is None else torch.tensor(r, dtype=torch.float32) for r in ret])
    stats = proj.step(lam)
    assert stats["projection_coef"] == pytest.approx(c, rel=1e-6)  # float32 buffers
    got = proj.action_grads()
    assert set(map(id, got)) == {id(params[0]), id(params[1])}
    for i in (0, 1):
        want = act[i] - c * ret[i]
        np.testing.assert_allclose(got[params[i]].numpy(), want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(params[i].grad.numpy() - lam * ret[i], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(params[2].grad.numpy(), act[2], rtol=1e-6)
    off = CRaFTGradientProjector([torch.nn.Parameter(torch.zeros(s)) for s in shapes], delta=delta)
    off.add_grads(t, [None if r is None else torch.tensor(r, dtype=torch.float32) for r in ret])
    off.step(lam)
    assert off._action_flat.numel() == 0
    with pytest.raises(RuntimeError, match="needs keep_action_part"):
        off.action_grads()
