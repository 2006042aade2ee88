"""ConSFT-style conservative L1 objective (this project's reading of arXiv 2605.08879; its formula is not public).

Per sample i of a micro-batch, ℓ_i = mean over the chunk and action dims of |pred − target| (the VLA-Adapter L1).
Since L1 regression is the negative log-likelihood of a Laplace distribution, exp(−ℓ_i / τ) is (up to a constant)
the model's likelihood of the demonstrated chunk, with scale τ: the model's confidence in that sample. Weights

    w_i = clip( exp(−ℓ_i/τ) / mean_j exp(−ℓ_j/τ),  1 − ρ,  1 + ρ )       (detached: no gradient through w)
    L   = mean_i w_i ℓ_i

scale each sample's learning signal by its relative confidence (mean 1 before clipping), and the clip is a trust
region keeping every sample's step within a factor [1 − ρ, 1 + ρ] of plain SFT. Samples the current model finds
surprising (large ℓ_i: far from what it already does) are damped, so the update moves less toward them: conservative.
ρ = 0 is exactly the plain L1 objective. No reference network. See docs/BASELINES.md.
"""

from __future__ import annotations

import math

import torch


def consft_weights(per_sample_loss: torch.Tensor, tau: float, clip: float) -> torch.Tensor:
    """w_i (detached, float32) from per-sample losses (B,); see the module docstring."""
    if per_sample_loss.ndim != 1 or per_sample_loss.numel() == 0:
        raise ValueError(f"per-sample losses must be a non-empty (B,) tensor, got shape {tuple(per_sample_loss.shape)}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"consft tau (temperature, in L1 units) must be > 0, got {tau}")
    if not (math.isfinite(clip) and 0 <= clip < 1):
        raise ValueError(f"consft clip rho must be in [0, 1), got {clip}")
    logits = -per_sample_loss.detach().double() / tau
    # exp(x_i) / mean_j exp(x_j) = exp(x_i - logmeanexp(x)): stable for any tau
    log_mean = torch.logsumexp(logits, dim=0) - math.log(logits.numel())
    ratio = torch.exp(logits - log_mean)
    return ratio.clamp(1.0 - clip, 1.0 + clip).float()


def consft_weighted_l1(pred: torch.Tensor, target: torch.Tensor, tau: float,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, weights): loss = mean_i w_i ℓ_i with ℓ_i the per-sample mean L1 over (chunk, action dims).

    pred, target: (B, K, A) normalised action chunks. weights: (B,) detached float32.
    """
    if pred.shape != target.shape or pred.ndim < 2:
        raise ValueError(f"predicted actions {tuple(pred.shape)} and targets {tuple(target.shape)} must have the same "
                         "shape (B, chunk, action_dim)")
    per_sample = (pred.float() - target.float()).abs().flatten(1).mean(dim=1)
    weights = consft_weights(per_sample, tau, clip)
    return (weights.to(per_sample.device) * per_sample).mean(), weights


def consft_stats(weights: torch.Tensor, clip: float) -> dict[str, float]:
    """Numbers worth logging per step: weight range and the share of samples at a clip bound."""
    w = weights.detach().double()
    lo, hi = 1.0 - clip, 1.0 + clip
    tol = 1e-6
    return {"ConSFT/Weight Mean": float(w.mean()), "ConSFT/Weight Min": float(w.min()),
            "ConSFT/Weight Max": float(w.max()),
            "ConSFT/Clipped Fraction": float(((w <= lo + tol) | (w >= hi - tol)).double().mean()) if clip > 0 else 0.0}


def consft_gradients(model: torch.nn.Module, micro_batches, device: torch.device, tau: float, clip: float) -> dict:
    """Drop-in for `train_step.plain_gradients` under `--retention_method consft`.

    Per micro-batch: backward of consft_weighted_l1 / k (weights normalised within the micro-batch), DDP all-reduce on
    the last micro-batch only. Returns this rank's numbers: `loss`, `curr_l1`, `next_l1` (unweighted L1, means over
    micro-batches), `consft_loss` (mean), `weight_mean` (mean), `weight_min` / `weight_max` (min / max),
    `clipped_fraction` (mean), all float64 tensors.
    """
    from prismatic.training.train_step import plain_gradients  # local: no import cycle

    extremes: list[tuple[float, float]] = []  # (min, max) weight of each micro-batch

    def objective(l1: torch.Tensor, out, micro) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weighted, weights = consft_weighted_l1(out.actions, micro.batch["actions"], tau, clip)
        stats = consft_stats(weights, clip)
        extremes.append((stats["ConSFT/Weight Min"], stats["ConSFT/Weight Max"]))
        return weighted, {"consft_loss": weighted, "weight_mean": torch.tensor(stats["ConSFT/Weight Mean"]),
                          "clipped_fraction": torch.tensor(stats["ConSFT/Clipped Fraction"])}

    result = plain_gradients(model, micro_batches, device, objective)
    result["weight_min"] = torch.tensor(min(lo for lo, _ in extremes), dtype=torch.float64)
    result["weight_max"] = torch.tensor(max(hi for _, hi in extremes), dtype=torch.float64)
    return result
