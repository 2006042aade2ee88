"""ConSFT-style weighted L1: loss, weights and gradient against numpy; clip bounds; ρ = 0 is plain L1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prismatic.training.consft import consft_stats, consft_weighted_l1


def _batch(seed: int = 0, b: int = 8):
    g = torch.Generator().manual_seed(seed)
    # per-sample error scales spread out so that some weights hit each clip bound
    scale = torch.linspace(0.02, 0.6, b).view(b, 1, 1)
    target = torch.rand(b, 8, 7, generator=g) * 2 - 1
    pred = target + scale * torch.randn(b, 8, 7, generator=g)
    return pred.requires_grad_(True), target


def _numpy_consft(pred: np.ndarray, target: np.ndarray, tau: float, rho: float):
    per = np.abs(pred - target).reshape(len(pred), -1).mean(axis=1)
    e = np.exp(-per / tau)
    w = np.clip(e / e.mean(), 1 - rho, 1 + rho)
    return float((w * per).mean()), w, per


@pytest.mark.parametrize("tau,rho", [(0.1, 0.3), (0.5, 0.2), (0.02, 0.5)])
def test_loss_weights_and_gradient_match_numpy(tau, rho):
    pred, target = _batch()
    loss, weights = consft_weighted_l1(pred, target, tau, rho)
    exp_loss, exp_w, _ = _numpy_consft(pred.detach().double().numpy(), target.double().numpy(), tau, rho)
    assert loss.item() == pytest.approx(exp_loss, rel=1e-5)
    np.testing.assert_allclose(weights.numpy(), exp_w, rtol=1e-5)
    assert not weights.requires_grad
    assert (weights >= 1 - rho - 1e-6).all() and (weights <= 1 + rho + 1e-6).all()
    loss.backward()
    # weights are constants: d/dpred = w_i sign(pred - target) / (B K A)
    b, k, a = pred.shape
    sign = np.sign(pred.detach().numpy() - target.numpy())
    np.testing.assert_allclose(pred.grad.numpy(), exp_w[:, None, None] * sign / (b * k * a), rtol=1e-5, atol=1e-9)


def test_clip_bounds_are_reached_and_hold():
    pred, target = _batch(seed=1, b=16)
    _, weights = consft_weighted_l1(pred, target, tau=0.02, clip=0.25)
    assert weights.min().item() == pytest.approx(0.75) and weights.max().item() == pytest.approx(1.25)
    stats = consft_stats(weights, 0.25)
    assert stats["ConSFT/Weight Min"] == pytest.approx(0.75) and 0 < stats["ConSFT/Clipped Fraction"] <= 1
    # confident (low-error) samples are up-weighted: weights fall with the per-sample error
    _, _, per = _numpy_consft(pred.detach().numpy(), target.numpy(), 0.02, 0.25)
    order = np.argsort(per)
    assert np.all(np.diff(weights.numpy()[order]) <= 1e-6)


def test_rho_zero_is_plain_l1_and_bad_parameters_fail():
    pred, target = _batch(seed=2)
    loss, weights = consft_weighted_l1(pred, target, tau=0.1, clip=0.0)
    assert torch.equal(weights, torch.ones_like(weights))
    assert loss.item() == pytest.approx((pred - target).abs().mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="tau"):
        consft_weighted_l1(pred, target, tau=0.0, clip=0.2)
    with pytest.raises(ValueError, match="rho"):
        consft_weighted_l1(pred, target, tau=0.1, clip=1.0)
    with pytest.raises(ValueError, match="same shape"):
        consft_weighted_l1(pred, target[:, :4], tau=0.1, clip=0.2)


def test_extreme_tau_is_stable():
    pred, target = _batch(seed=3)
    loss, weights = consft_weighted_l1(pred, target, tau=1e-6, clip=0.3)  # exp underflows without the log-mean trick
    assert torch.isfinite(loss) and torch.isfinite(weights).all()
    # tau -> 0: the most confident sample takes ratio B (-> 1 + rho), every other one ratio 0 (-> 1 - rho)
    per = (pred - target).abs().flatten(1).mean(1).detach()
    expected = torch.full_like(weights, 0.7)
    expected[per.argmin()] = 1.3
    torch.testing.assert_close(weights, expected)
    _, exp_w, _ = _numpy_consft(pred.detach().double().numpy(), target.double().numpy(), 1e6, 0.3)
    _, w_big = consft_weighted_l1(pred, target, tau=1e6, clip=0.3)  # huge tau: all weights ≈ 1
    np.testing.assert_allclose(w_big.numpy(), exp_w, rtol=1e-6)
