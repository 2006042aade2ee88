"""Layer-wise representation drift between a reference model θ0 and a fine-tuned model (pure functions).

For every LLM layer l = 0..L (hidden-state indexing of docs/craft/PROJECT_STRUCTURE.md) and both bridge groups
(`raw`: Raw Latent = vision tokens, `aq`: ActionQuery tokens), on pooled features f_l(x) = masked mean over the
group's tokens (the Pool of CRaFT, `prismatic.training.craft_utils.masked_mean`):

- retention: mean over samples of Σ_dims (f_l^ft − f_l^ref)²  — the units of CRaFT's L_ret (docs/CRAFT.md), so
  `raw[m] + aq[M]` is the L_ret of the default `concat` anchor;
- linear CKA between the two models' (n, D) feature matrices: ||Y_cᵀ X_c||_F² / (||X_cᵀ X_c||_F ||Y_cᵀ Y_c||_F) on
  column-centred features (1 = same representation up to rotation, isotropic scaling and translation);
- linear-probe accuracy (multinomial logistic regression, L2-regularised, L-BFGS) predicting the task (instruction)
  from each model's features, fit on a train split and scored on a held-out split (by episode where possible).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from prismatic.training.craft_utils import masked_mean

GROUPS = ("raw", "aq")
DEGENERATE_RTOL = 1e-6  # centred features this small relative to the raw ones count as constant across samples


# -------------------------------------------------------------------------------------------------- features
def pooled_layer_features(vla_output) -> dict[str, torch.Tensor]:
    """{"raw": (B, L+1, D), "aq": (B, L+1, D)} float32: masked means of every hidden state over the Raw Latent and
    the ActionQuery latent groups the head reads (masks from `vla_output.layout`, never offsets)."""
    layout = vla_output.layout
    hidden = vla_output.hidden_states
    raw = [masked_mean(h, layout.raw_latent_mask, f"Raw Latent (layer {i})") for i, h in enumerate(hidden)]
    aq = [masked_mean(h, layout.action_query_latent_mask, f"ActionQuery (layer {i})") for i, h in enumerate(hidden)]
    return {"raw": torch.stack(raw, dim=1), "aq": torch.stack(aq, dim=1)}


def _as_float64(x) -> torch.Tensor:
    t = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x))
    return t.to(torch.float64)


def retention_per_layer(reference: torch.Tensor, finetuned: torch.Tensor) -> np.ndarray:
    """(n, L+1, D) x2 -> (L+1,): mean over samples of Σ_dims (f_ft − f_ref)² per layer."""
    ref, ft = _as_float64(reference), _as_float64(finetuned)
    if ref.shape != ft.shape or ref.ndim != 3:
        raise ValueError(f"reference {tuple(ref.shape)} and fine-tuned {tuple(ft.shape)} features must both be "
                         "(n, L+1, D) with the same shape")
    return (ft - ref).pow(2).sum(dim=2).mean(dim=0).numpy()


# ------------------------------------------------------------------------------------------------------ CKA
def linear_cka(X, Y, rtol: float = DEGENERATE_RTOL) -> float:
    """Linear CKA of two feature matrices over the same n samples: X (n, d1), Y (n, d2); computed in float64.

    Convention for degenerate inputs (features constant across samples, e.g. ActionQueries at layer 0, which are the
    same embedding for every sample): both constant -> 1.0 (both are the zero representation once centred, which CKA's
    translation invariance makes equal); only one constant -> 0.0.
    """
    x, y = _as_float64(X), _as_float64(Y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka needs (n, d1) and (n, d2) over the same samples, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if x.shape[0] < 2:
        raise ValueError(f"linear_cka needs at least 2 samples, got {x.shape[0]}")
    xc, yc = x - x.mean(dim=0, keepdim=True), y - y.mean(dim=0, keepdim=True)
    x_const = float(xc.norm()) <= rtol * float(x.norm()) or float(xc.norm()) == 0.0
    y_const = float(yc.norm()) <= rtol * float(y.norm()) or float(yc.norm()) == 0.0
    if x_const or y_const:
        return 1.0 if (x_const and y_const) else 0.0
    # Gram form when n < d (same value, cheaper): ||Yᵀ X||_F² = <X Xᵀ, Y Yᵀ>_F, ||Xᵀ X||_F = ||X Xᵀ||_F.
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        k, m = xc @ xc.T, yc @ yc.T
        cross, nx, ny = (k * m).sum(), k.norm(), m.norm()
    else:
        cross, nx, ny = (yc.T @ xc).pow(2).sum(), (xc.T @ xc).norm(), (yc.T @ yc).norm()
    return float(cross / (nx * ny))


# -------------------------------------------------------------------------------------------------- probes
@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features: logits = ((x − mean) / std) W + b."""

    weight: torch.Tensor  # (d, C) float64
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (d,)
    std: torch.Tensor  # (d,)

    def logits(self, X) -> torch.Tensor:
        return ((_as_float64(X) - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, X) -> np.ndarray:
        return self.logits(X).argmax(dim=1).numpy()


def fit_linear_probe(X, y, num_classes: int, l2: float = 1e-3, max_iter: int = 200) -> LinearProbe:
    """Minimise mean cross-entropy + (l2 / 2) ||W||_F² (bias not penalised) with full-batch L-BFGS in float64.

    Features are standardised with the training mean / std; features whose spread is below DEGENERATE_RTOL of the
    largest |feature| are ignored (see below). With l2 > 0 the problem is strictly
    convex in W, so the result does not depend on the start (zeros) beyond the solver tolerance.
    """
    x = _as_float64(X)
    labels = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"probe features must be (n, d) with n labels, got {tuple(x.shape)} and "
                         f"{tuple(labels.shape)}")
    if labels.numel() == 0 or int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"probe labels must lie in [0, {num_classes}), got range "
                         f"{[int(labels.min()), int(labels.max())] if labels.numel() else 'empty'}")
    if l2 < 0:
        raise ValueError(f"probe l2 must be >= 0, got {l2}")
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    # Features constant up to float rounding (e.g. ActionQueries at layer 0) are dropped (std = inf -> z = 0): the
    # rounding noise of a masked mean depends on the token positions, i.e. on the prompt length, and standardising
    # it would let the probe read the task from summation order instead of from the representation.
    scale = float(x.abs().max()) if x.numel() else 0.0
    std = torch.where(std <= DEGENERATE_RTOL * scale, torch.full_like(std, float("inf")), std)
    z = (x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight + bias, labels) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight.detach(), bias.detach(), mean, std)


def linear_probe_accuracy(train_X, train_y, test_X, test_y, num_classes: int | None = None, l2: float = 1e-3,
                          max_iter: int = 200) -> float:
    """Held-out accuracy of a linear probe fit on (train_X, train_y)."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    if len(test_y) == 0:
        raise ValueError("the probe's held-out split is empty")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    probe = fit_linear_probe(train_X, train_y, num_classes, l2=l2, max_iter=max_iter)
    return float((probe.predict(test_X) == test_y).mean())


def probe_split(labels: Sequence[int], groups: Sequence[str] | None = None, test_fraction: float = 0.25,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """(train indices, test indices, how) for the task probe.

    Per task: with groups (episode ids) and >= 2 episodes of that task, hold out round(fraction · episodes) episodes
    (at least 1, at most all but 1) so correlated frames of one episode never sit on both sides; otherwise hold out
    round(fraction · frames) frames of the task (at least 1 if it has >= 2). `how` is "by_episode", "by_sample" or
    "mixed".
    """
    labels = np.asarray(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"probe test_fraction must be in (0, 1), got {test_fraction}")
    if groups is not None and len(groups) != len(labels):
        raise ValueError(f"{len(groups)} groups for {len(labels)} labels")
    rng = np.random.default_rng(seed)
    test, modes = [], set()
    for task in np.unique(labels):
        idx = np.flatnonzero(labels == task)
        episodes = sorted({groups[i] for i in idx}) if groups is not None else []
        if len(episodes) >= 2:
            count = min(max(1, round(test_fraction * len(episodes))), len(episodes) - 1)
            held = set(rng.permutation(np.asarray(episodes, dtype=object))[:count].tolist())
            test.extend(int(i) for i in idx if groups[i] in held)
            modes.add("by_episode")
        elif len(idx) >= 2:
            count = min(max(1, round(test_fraction * len(idx))), len(idx) - 1)
            test.extend(int(i) for i in rng.permutation(idx)[:count])
            modes.add("by_sample")
    test_idx = np.asarray(sorted(test), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    how = modes.pop() if len(modes) == 1 else ("mixed" if modes else "none")
    return train_idx, test_idx, how


# ------------------------------------------------------------------------------------------------ all layers
def layerwise_drift(reference: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], labels: Sequence[int],
                    groups: Sequence[str] | None = None, test_fraction: float = 0.25, seed: int = 0,
                    l2: float = 1e-3, max_iter: int = 200) -> dict:
    """Per group ("raw", "aq") and layer: retention, CKA, probe accuracy of each model (see module docstring).

    reference / finetuned: `pooled_layer_features` outputs concatenated over the same samples, (n, L+1, D) each.
    labels: task index per sample; groups: episode id per sample (for the probe split).
    """
    missing = [g for g in GROUPS if g not in reference or g not in finetuned]
    if missing:
        raise KeyError(f"features lack groups {missing} (expected keys {list(GROUPS)})")
    labels = np.asarray(labels, dtype=np.int64)
    n = reference["raw"].shape[0]
    if len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} samples")
    train_idx, test_idx, how = probe_split(labels, groups, test_fraction, seed)
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    can_probe = len(np.unique(labels[train_idx])) >= 2 and len(test_idx) > 0
    out: dict = {}
    for group in GROUPS:
        ref, ft = _as_float64(reference[group]), _as_float64(finetuned[group])
        retention = retention_per_layer(ref, ft)
        layers = ref.shape[1]
        cka = [linear_cka(ref[:, layer], ft[:, layer]) for layer in range(layers)]
        acc_ref, acc_ft = [], []
        for layer in range(layers):
            for feats, acc in ((ref[:, layer], acc_ref), (ft[:, layer], acc_ft)):
                acc.append(linear_probe_accuracy(feats[train_idx], labels[train_idx], feats[test_idx],
                                                 labels[test_idx], num_classes, l2, max_iter) if can_probe else None)
        out[group] = {"retention": [float(v) for v in retention], "cka": cka, "probe_accuracy_reference": acc_ref,
                      "probe_accuracy_finetuned": acc_ft}
    counts = np.bincount(labels[test_idx], minlength=num_classes) if len(test_idx) else np.zeros(1)
    out["probe"] = {"num_classes": num_classes, "num_train": int(len(train_idx)), "num_test": int(len(test_idx)),
                    "split": how, "test_fraction": test_fraction, "l2": l2, "seed": seed, "fitted": bool(can_probe),
                    "majority_accuracy": float(counts.max() / max(1, counts.sum()))}
    return out
