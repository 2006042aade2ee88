"""CRaFTGradientProjector (accumulation, .grad writing, coverage, state) and CRaFTDualOptimizer (exact rule)."""

from __future__ import annotations

import copy

import pytest
import torch
from craft_toy_models import ToyPolicy, toy_data, toy_losses

from prismatic.training.craft_utils import CRaFTDualOptimizer, CRaFTGradientProjector, combine_gradients


def _reference_grads(model, x, y, anchors, lam, delta=1e-8, projection=True):
    """Second code path: whole batch, plain autograd.grad of each loss, then the functional core."""
    params = [p for p in model.parameters() if p.requires_grad]
    la, lr = toy_losses(model, x, y, anchors)
    ga = torch.autograd.grad(la, params, retain_graph=True, allow_unused=True)
    gr = torch.autograd.grad(lr, params, allow_unused=True)
    ga = [torch.zeros_like(p) if g is None else g for p, g in zip(params, ga, strict=True)]
    return combine_gradients(ga, list(gr), lam, delta, projection)


@pytest.mark.parametrize("k", [1, 3])
def test_accumulated_micro_batches_equal_one_batch(k):
    torch.manual_seed(0)
    model = ToyPolicy()
    x, y, anchors = toy_data(6, seed=1)
    ref, ref_stats = _reference_grads(model, x, y, anchors, lam=0.4)
    proj = CRaFTGradientProjector(list(model.named_parameters()), delta=1e-8, enable_projection=True)
    for xb, yb, ab in zip(x.chunk(k), y.chunk(k), anchors.chunk(k), strict=True):
        la, lr = toy_losses(model, xb, yb, ab)
        proj.accumulate(la / k, lr / k)
    stats = proj.step(lam=0.4)
    params = list(model.parameters())
    for p, g in zip(params[:-2], ref[:-2], strict=True):  # the last two are `unused` (reached by no loss)
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert stats["dot"] == pytest.approx(ref_stats["dot"], rel=1e-5)
    assert stats["num_micro_batches"] == float(k)


def test_every_trainable_param_gets_its_grad_and_unreached_stay_none():
    torch.manual_seed(0)
    model = ToyPolicy()
    x, y, anchors = toy_data(4, seed=2)
    proj = CRaFTGradientProjector(model.parameters(), enable_projection=True)
    la, lr = toy_losses(model, x, y, anchors)
    ga_head = torch.autograd.grad(la, [model.act_head.weight, model.act_head.bias], retain_graph=True)
    proj.accumulate(la, lr)
    proj.step(lam=2.0)
    for name, p in model.named_parameters():
        if name.startswith("unused"):
            assert p.grad is None, name  # like a plain backward: optimizer skips it
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # only L_act reaches the head: it gets exactly g_act whatever λ and c are
    torch.testing.assert_close(model.act_head.weight.grad, ga_head[0], rtol=0, atol=0)
    torch.testing.assert_close(model.act_head.bias.grad, ga_head[1], rtol=0, atol=0)


def test_grad_written_in_place_into_existing_tensor():
    torch.manual_seed(0)
    model = ToyPolicy()
    x, y, anchors = toy_data(4, seed=3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 123.0)  # stands in for a DDP bucket view
    views = {n: p.grad for n, p in model.named_parameters()}
    ref, _ = _reference_grads(model, x, y, anchors, lam=0.1)
    proj = CRaFTGradientProjector(list(model.named_parameters()))
    proj.accumulate(*toy_losses(model, x, y, anchors))
    proj.step(lam=0.1)
    for (n, p), g in zip(model.named_parameters(), ref, strict=True):
        assert p.grad is views[n], n  # same tensor object: written with copy_
        if not n.startswith("unused"):
            torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
        else:
            assert torch.all(p.grad == 123.0)  # untouched


def test_buffers_reset_between_steps_and_capture_path_matches_autograd_path():
    torch.manual_seed(0)
    model = ToyPolicy()
    x, y, anchors = toy_data(4, seed=4)
    proj = CRaFTGradientProjector(list(model.named_parameters()))
    proj.accumulate(*toy_losses(model, x, y, anchors))
    proj.step(lam=0.2)
    first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for p in model.parameters():
        p.grad = None
    # second step with the backward + capture path on the same data: identical result (buffers were reset)
    la, lr = toy_losses(model, x, y, anchors)
    la.backward(retain_graph=True)
    proj.capture_grads("act")
    lr.backward()
    proj.capture_grads("ret")
    proj.step(lam=0.2)
    for n, p in model.named_parameters():
        if n in first:
            torch.testing.assert_close(p.grad, first[n], rtol=1e-6, atol=1e-8)


def test_running_stats_and_state_dict_roundtrip():
    torch.manual_seed(0)
    model = ToyPolicy()
    proj = CRaFTGradientProjector(model.parameters())
    fired = []
    for s in range(4):
        x, y, anchors = toy_data(4, seed=10 + s)
        proj.accumulate(*toy_losses(model, x, y, anchors))
        fired.append(proj.step(lam=0.0)["projection_fired"])
    rs = proj.running_stats()
    assert rs["steps"] == 4.0 and rs["projection_fired_rate"] == pytest.approx(sum(fired) / 4)
    proj2 = CRaFTGradientProjector(model.parameters())
    proj2.load_state_dict(copy.deepcopy(proj.state_dict()))
    assert proj2.running_stats() == rs
    with pytest.raises(KeyError, match="missing"):
        proj2.load_state_dict({"steps": 1})


def test_projector_bad_inputs():
    model = ToyPolicy()
    proj = CRaFTGradientProjector(model.parameters())
    with pytest.raises(RuntimeError, match="no accumulated"):
        proj.step(lam=0.0)
    with pytest.raises(ValueError, match="scalar"):
        proj.accumulate(torch.zeros(2, requires_grad=True), torch.zeros((), requires_grad=True))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="does not require grad"):
        CRaFTGradientProjector([frozen])
    with pytest.raises(ValueError, match="delta"):
        CRaFTGradientProjector(model.parameters(), delta=-1.0)


def test_dual_rule_exact_and_state_roundtrip():
    eps, eta = 0.1, 0.5
    dual = CRaFTDualOptimizer(epsilon=eps, dual_lr=eta, init_lambda=0.2)
    lam, seq = 0.2, [0.5, 0.05, 0.0, 0.0, 0.3, 1.2]
    for v in seq:
        lam = max(0.0, lam + eta * (v - eps))  # hand-written rule
        assert dual.step(v) == pytest.approx(lam, abs=1e-15)
    assert dual.lam == pytest.approx(lam) and dual.steps == len(seq)
    restored = CRaFTDualOptimizer(epsilon=eps, dual_lr=eta)
    restored.load_state_dict(dual.state_dict())
    assert restored.lam == dual.lam and restored.steps == dual.steps
    assert restored.step(torch.tensor(0.9)) == pytest.approx(max(0.0, lam + eta * 0.8))


def test_dual_clamps_at_zero_and_fixed_lambda():
    dual = CRaFTDualOptimizer(epsilon=1.0, dual_lr=1.0, init_lambda=0.3)
    assert dual.step(0.0) == 0.0  # 0.3 - 1.0 < 0 -> clamped
    fixed = CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.01, enable_dual=False, fixed_lambda=0.7)
    for v in (5.0, 0.0, 2.0):
        assert fixed.step(v) == 0.7
    fixed.load_state_dict({"lambda": 3.0, "steps": 9})
    assert fixed.lam == 0.7 and fixed.steps == 9


def test_dual_bad_inputs():
    with pytest.raises(ValueError, match="epsilon"):
        CRaFTDualOptimizer(epsilon=-0.1, dual_lr=0.01)
    with pytest.raises(ValueError, match="dual_lr"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=-1.0)
    with pytest.raises(ValueError, match="fixed_lambda"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.01, enable_dual=False, fixed_lambda=-1.0)
    with pytest.raises(ValueError, match="enable_dual=False"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.01, enable_dual=True, fixed_lambda=1.0)
    with pytest.raises(FloatingPointError, match="not finite"):
        CRaFTDualOptimizer(epsilon=0.1, dual_lr=0.01).step(float("nan"))
