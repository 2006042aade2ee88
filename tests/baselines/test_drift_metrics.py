"""drift_metrics: CKA against a numpy HSIC implementation and its invariances, probes, pooled features, drift."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from baseline_helpers import tiny_batch

from prismatic.training.craft_utils import CRaFTFeatureExtractor
from prismatic.training.drift_metrics import (
    fit_linear_probe,
    layerwise_drift,
    linear_cka,
    linear_probe_accuracy,
    pooled_layer_features,
    probe_split,
    retention_per_layer,
)


def _numpy_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """CKA from HSIC with linear kernels and explicit centering matrices: tr(KHLH) / sqrt(tr(KHKH) tr(LHLH))."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T

    def hsic(A, B):
        return np.trace(A @ H @ B @ H)

    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


@pytest.mark.parametrize("n,d1,d2", [(60, 12, 20), (10, 40, 30)])  # n > d and n < d (Gram branch)
def test_linear_cka_matches_numpy_hsic(n, d1, d2):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, d1)) + 3.0
    Y = np.tanh(X @ rng.normal(size=(d1, d2))) + 0.5 * rng.normal(size=(n, d2))
    assert linear_cka(X, Y) == pytest.approx(_numpy_cka(X, Y), rel=1e-10)
    assert linear_cka(torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32)) == pytest.approx(
        _numpy_cka(X, Y), rel=1e-5)
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < linear_cka(X, Y) < 1.0


def test_linear_cka_invariances():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(40, 16)), rng.normal(size=(40, 24))
    Q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    base = linear_cka(X, Y)
    assert linear_cka(X @ Q, Y) == pytest.approx(base, rel=1e-10)  # orthogonal transform
    assert linear_cka(7.3 * X, 0.01 * Y) == pytest.approx(base, rel=1e-10)  # isotropic scaling
    assert linear_cka(X + 5.0, Y) == pytest.approx(base, rel=1e-10)  # translation
    assert linear_cka(X @ np.diag(np.linspace(0.1, 10, 16)), Y) != pytest.approx(base, rel=1e-3)  # anisotropic: not
    const = np.ones((40, 16)) * rng.normal(size=(1, 16))
    assert linear_cka(const, const * 2.0) == 1.0 and linear_cka(const, Y) == 0.0
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(X, Y[:10])


def test_probe_reaches_the_optimum_and_separates_separable_data():
    rng = np.random.default_rng(2)
    centers = rng.normal(scale=4.0, size=(3, 10))
    y = np.repeat(np.arange(3), 30)
    X = centers[y] + rng.normal(size=(90, 10))
    l2 = 1e-2
    probe = fit_linear_probe(X, y, 3, l2=l2, max_iter=500)
    # optimality of the strictly convex objective, checked with a numpy gradient
    Z = (X - probe.mean.numpy()) / probe.std.numpy()
    W, b = probe.weight.numpy(), probe.bias.numpy()
    logits = Z @ W + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[y]
    grad_w = Z.T @ (p - onehot) / len(y) + l2 * W
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-6 and np.abs(grad_b).max() < 1e-6
    np.testing.assert_array_equal(probe.predict(X), logits.argmax(1))
    tr, te, how = probe_split(y, test_fraction=0.3, seed=0)
    assert how == "by_sample"
    assert linear_probe_accuracy(X[tr], y[tr], X[te], y[te]) == 1.0
    # labels independent of the features: held-out accuracy near chance, not 1
    shuffled = rng.permutation(y)
    assert linear_probe_accuracy(X[tr], shuffled[tr], X[te], shuffled[te]) < 0.7


def test_probe_split_keeps_episodes_on_one_side():
    labels = np.repeat([0, 0, 1, 1, 2], 4)  # task 2 has a single episode -> split by frames
    groups = [f"ep{i}" for i in np.repeat([0, 1, 2, 3, 4], 4)]
    train, test, how = probe_split(labels, groups, test_fraction=0.5, seed=3)
    assert how == "mixed" and len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 20
    for ep in ("ep0", "ep1", "ep2", "ep3"):
        sides = {i in set(test.tolist()) for i in range(20) if groups[i] == ep}
        assert len(sides) == 1
    assert {labels[i] for i in test} == {0, 1, 2} and {labels[i] for i in train} == {0, 1, 2}


def test_retention_per_layer_matches_numpy():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(7, 5, 9)), rng.normal(size=(7, 5, 9))
    expected = [np.mean([np.sum((b[i, layer] - a[i, layer]) ** 2) for i in range(7)]) for layer in range(5)]
    np.testing.assert_allclose(retention_per_layer(torch.tensor(a), torch.tensor(b)), expected, rtol=1e-12)


def _features(vla, batches):
    parts = [pooled_layer_features(vla(*b)) for b in batches]
    return {g: torch.cat([p[g] for p in parts]) for g in ("raw", "aq")}


@torch.no_grad()
def test_pooled_features_match_the_craft_extractor(tiny_vla_factory):
    vla = tiny_vla_factory(0)
    batch = tiny_batch(3, seed=6)
    ext = CRaFTFeatureExtractor(vla, raw_layer=1, aq_layer=3)
    with ext.capture():
        out = vla(*batch)
    craft = ext.features(out.layout)
    feats = pooled_layer_features(out)
    L = vla.config.num_llm_layers
    assert feats["raw"].shape == (3, L + 1, 64) and feats["aq"].shape == (3, L + 1, 64)
    torch.testing.assert_close(torch.cat([feats["raw"][:, 1], feats["aq"][:, 3]], dim=1), craft, rtol=0, atol=0)


@torch.no_grad()
def test_self_drift_is_zero_and_perturbed_drift_positive(tiny_vla_factory):
    vla = tiny_vla_factory(0)
    batches = [tiny_batch(4, seed=s) for s in (10, 11, 12)]
    labels = np.asarray([0, 1] * 6)
    groups = [f"ep{i % 4}" for i in range(12)]
    ref = _features(vla, batches)
    same = _features(vla, batches)
    drift = layerwise_drift(ref, same, labels, groups, seed=0)
    L = vla.config.num_llm_layers
    for g in ("raw", "aq"):
        assert drift[g]["retention"] == [0.0] * (L + 1)
        np.testing.assert_allclose(drift[g]["cka"], 1.0, atol=1e-6)
        assert drift[g]["probe_accuracy_reference"] == drift[g]["probe_accuracy_finetuned"]

    moved = copy.deepcopy(vla)
    g = torch.Generator().manual_seed(0)
    moved.projector.fc3.weight.add_(0.2 * torch.randn(moved.projector.fc3.weight.shape, generator=g))
    drift = layerwise_drift(ref, _features(moved, batches), labels, groups, seed=0)
    assert all(v > 0 for v in drift["raw"]["retention"])  # projected patches move from layer 0 on
    assert drift["aq"]["retention"][0] == 0.0 and all(v > 0 for v in drift["aq"]["retention"][1:])
    assert all(c < 1 - 1e-6 for c in drift["raw"]["cka"])
    assert drift["probe"]["split"] == "by_episode" and drift["probe"]["num_test"] == 6


def test_probe_ignores_rounding_noise_of_constant_features():
    """Masked means of identical tokens differ only by summation-order rounding, which depends on the prompt length
    (the task): the probe must not read the label from that noise."""
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1, 2], 8)
    X = np.ones((24, 6)) * rng.normal(size=(1, 6)) * (1.0 + 1e-9 * y[:, None])
    tr, te, _ = probe_split(y, test_fraction=0.25, seed=1)
    acc = linear_probe_accuracy(X[tr], y[tr], X[te], y[te])
    assert acc == pytest.approx(np.bincount(y[te]).max() / len(te))  # one constant prediction at best
    assert linear_probe_accuracy(X[tr] + y[tr, None] * 0.1, y[tr], X[te] + y[te, None] * 0.1, y[te]) == 1.0
