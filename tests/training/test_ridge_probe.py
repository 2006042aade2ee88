"""The ridge linear probe against an independent numpy least-squares solution (augmented system, np.linalg.lstsq)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prismatic.training.ridge_probe import fit_ridge_probe


def numpy_probe_accuracy(train_x, train_y, test_x, test_y, alpha):
    """Independent path: ridge as ordinary least squares on [X̃; √alpha I] vs [Y; 0], solved by lstsq."""
    mu, sd = train_x.mean(0), np.maximum(train_x.std(0), 1e-6)
    design = lambda x: np.hstack([(x - mu) / sd, np.ones((len(x), 1))])  # noqa: E731
    classes = np.unique(train_y)
    y = (train_y[:, None] == classes[None, :]).astype(np.float64)
    a = design(train_x)
    big_a = np.vstack([a, np.sqrt(alpha) * np.eye(a.shape[1])])
    big_y = np.vstack([y, np.zeros((a.shape[1], len(classes)))])
    w, *_ = np.linalg.lstsq(big_a, big_y, rcond=None)
    return float(np.mean(classes[(design(test_x) @ w).argmax(1)] == test_y))


@pytest.mark.parametrize("alpha", [0.1, 10.0])
def test_probe_accuracy_equals_numpy_least_squares(alpha):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 12)) * 1.5
    train_y, test_y = rng.integers(0, 4, 80), rng.integers(0, 4, 60)
    train_x = centres[train_y] + rng.normal(size=(80, 12)) * 1.5
    test_x = centres[test_y] + rng.normal(size=(60, 12)) * 1.5
    train_x[:, 3] = 2.0  # a constant feature (σ floor)
    probe = fit_ridge_probe(torch.tensor(train_x), train_y, alpha=alpha)
    got = probe.accuracy(torch.tensor(test_x), test_y)
    assert got == numpy_probe_accuracy(train_x, train_y, test_x, test_y, alpha)
    assert 0.3 < got < 1.0  # neither chance nor trivially separable: the comparison can fail


def test_probe_bad_inputs():
    with pytest.raises(ValueError, match="alpha"):
        fit_ridge_probe(torch.zeros(3, 2), np.zeros(3, dtype=int), alpha=0.0)
    with pytest.raises(ValueError, match="labels"):
        fit_ridge_probe(torch.zeros(3, 2), np.zeros(2, dtype=int))
