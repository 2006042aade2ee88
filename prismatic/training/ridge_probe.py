"""A BlindVLA-style linear probe: does a representation still encode what the pre-training scenes contained?

Fit ONCE on θ0's pooled features of the pre-training frames (labels: task id, block colour, ...), then apply the same
probe, unchanged, to the features another model (plain, CRaFT, ...) computes on held-out pre-training frames. A model
whose features moved away from θ0's loses accuracy even if the information is still there in some other form: that
is the point, the probe measures retention of θ0's representation, not re-learnability.

Probe: ridge regression of one-hot labels on standardised features (statistics of the θ0 training features), every
weight (bias included) penalised by `alpha`; one closed form in float64 (deterministic, no iterative solver, so its
accuracy can be checked exactly against an independent least-squares solution; `drift_metrics.py` has the
logistic-regression probe of `measure_drift.py`):

    X̃ = [(X - μ) / σ , 1],   W = argmin ||X̃ W - Y||² + alpha ||W||²  =  (X̃ᵀX̃ + alpha I)⁻¹ X̃ᵀ Y,   ŷ = argmax X̃ W
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SIGMA_FLOOR = 1e-6  # a feature constant over θ0's frames is centred, not blown up


@dataclass(frozen=True)
class RidgeProbe:
    mean: torch.Tensor  # (F,)
    std: torch.Tensor  # (F,)
    weight: torch.Tensor  # (F + 1, C)
    classes: tuple[int, ...]

    def _design(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.to(torch.float64) - self.mean) / self.std
        return torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)

    def predict(self, features: torch.Tensor) -> np.ndarray:
        scores = self._design(features) @ self.weight
        return np.asarray(self.classes)[scores.argmax(dim=1).numpy()]

    def accuracy(self, features: torch.Tensor, labels: np.ndarray) -> float:
        labels = np.asarray(labels)
        if len(labels) != len(features) or len(labels) == 0:
            raise ValueError(f"{len(features)} feature rows for {len(labels)} labels")
        return float(np.mean(self.predict(features) == labels))


def fit_ridge_probe(features: torch.Tensor, labels: np.ndarray, alpha: float = 1.0) -> RidgeProbe:
    """Ridge probe of `labels` (ints) on `features` (N, F); see the module docstring."""
    labels = np.asarray(labels)
    if features.dim() != 2 or len(features) != len(labels) or len(labels) == 0:
        raise ValueError(f"features {tuple(features.shape)} and labels ({len(labels)}) must be (N, F) and (N,)")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x = features.detach().cpu().to(torch.float64)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(SIGMA_FLOOR)
    classes = tuple(int(c) for c in np.unique(labels))
    onehot = torch.as_tensor(labels[:, None] == np.asarray(classes)[None, :], dtype=torch.float64)
    probe = RidgeProbe(mean, std, torch.zeros(0), classes)
    design = probe._design(x)
    gram = design.T @ design + alpha * torch.eye(design.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, design.T @ onehot)
    return RidgeProbe(mean, std, weight, classes)
