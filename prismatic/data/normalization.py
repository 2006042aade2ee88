"""BOUNDS_Q99 normalisation of actions and proprio, shared by the data pipeline and `predict_action`.

x_norm = clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1) on the dims where `mask` is True; other dims are left
as they are (the LIBERO gripper action). Dims with min == max map to 0 (a constant carries no information).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

NORM_EPS = 1e-8
REQUIRED_STAT_KEYS = ("q01", "q99")


def _stat(stats: Mapping, key: str, what: str) -> np.ndarray:
    if key not in stats:
        raise KeyError(f"{what} statistics have no '{key}' entry (keys present: {sorted(stats)}); "
                       "BOUNDS_Q99 (un)normalisation needs q01 and q99")
    return np.asarray(stats[key], dtype=np.float64)


def _mask(stats: Mapping, dim: int) -> np.ndarray:
    mask = stats.get("mask")
    return np.ones(dim, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def normalize_bounds_q99(x: np.ndarray, stats: Mapping, what: str = "action") -> np.ndarray:
    """Normalise `x` (..., D) to [-1, 1] with q01/q99 bounds; masked-out dims pass through unchanged."""
    x = np.asarray(x, dtype=np.float64)
    q01, q99 = _stat(stats, "q01", what), _stat(stats, "q99", what)
    if q01.shape[-1] != x.shape[-1]:
        raise ValueError(f"{what} has {x.shape[-1]} dims but its statistics have {q01.shape[-1]}")
    mask = _mask(stats, x.shape[-1])
    out = np.clip(2.0 * (x - q01) / (q99 - q01 + NORM_EPS) - 1.0, -1.0, 1.0)
    if "min" in stats and "max" in stats:
        constant = np.asarray(stats["min"], dtype=np.float64) == np.asarray(stats["max"], dtype=np.float64)
        out = np.where(constant, 0.0, out)
    return np.where(mask, out, x).astype(np.float32)


def normalize_proprio_for_eval(state: np.ndarray, stats: Mapping) -> np.ndarray:
    """The robot state as upstream's evaluation normalises it (`normalize_proprio`): `normalize_bounds_q99`, then
    every dim clipped to [-1, 1], masked-out dims included (upstream's training leaves those unclipped; its
    evaluation clips them, and this follows the evaluation). Dims with min == max stay 0 as in training, where
    upstream's evaluation formula would give +-1: the policy is fed what it was trained on (docs/LIBERO_EVAL.md)."""
    return np.clip(normalize_bounds_q99(state, stats, "proprio"), -1.0, 1.0)


def unnormalize_bounds_q99(x_norm: np.ndarray, stats: Mapping, what: str = "action") -> np.ndarray:
    """Invert `normalize_bounds_q99` on masked dims: x = (x_norm + 1) / 2 * (q99 - q01 + 1e-8) + q01."""
    x_norm = np.asarray(x_norm, dtype=np.float64)
    q01, q99 = _stat(stats, "q01", what), _stat(stats, "q99", what)
    if q01.shape[-1] != x_norm.shape[-1]:
        raise ValueError(f"{what} has {x_norm.shape[-1]} dims but its statistics have {q01.shape[-1]}")
    mask = _mask(stats, x_norm.shape[-1])
    out = 0.5 * (x_norm + 1.0) * (q99 - q01 + NORM_EPS) + q01
    return np.where(mask, out, x_norm).astype(np.float32)
