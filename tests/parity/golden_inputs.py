"""Deterministic weights and inputs of the upstream-parity fixtures: the one definition both sides use.

`generate_upstream_golden.py` runs upstream VLA-Adapter's own classes (a checkout outside this repo, on upstream's
pinned library versions) on exactly these tensors and writes `upstream_golden.json`; the tests feed the same tensors
to this project's modules. Every weight is a pure function of (name, shape), so neither side stores weights.
This module must import under upstream's pinned stack too (torch 2.2, numpy 1.26): numpy, torch and zlib only.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

HIDDEN = 64            # head width (8 heads of 8: even head dim for RoPE)
NUM_LAYERS = 24        # upstream's head has 24 blocks, fed by LLM layers 1..24
NUM_RAW = 300          # raw-latent tokens: > 256, so bf16-rounded RoPE positions are exercised
NUM_QUERIES = 64
BATCH = 2
PROPRIO_DIM = 8


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(name.encode()))


def param_value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Weights: N(0, 1/sqrt(fan_in)); LayerNorm weights 1 + N(0, 0.1); biases N(0, 0.05); gates tanh-visible."""
    rng = _rng(name)
    if name.endswith("gating_factor"):
        return torch.tensor(rng.uniform(0.3, 1.2, shape), dtype=torch.float32)
    if "norm" in name and name.endswith("weight"):
        return torch.tensor(1.0 + 0.1 * rng.standard_normal(shape), dtype=torch.float32)
    if name.endswith("bias") or len(shape) == 1:
        return torch.tensor(0.05 * rng.standard_normal(shape), dtype=torch.float32)
    return torch.tensor(rng.standard_normal(shape) / np.sqrt(shape[-1]), dtype=torch.float32)


def fill_module(module: torch.nn.Module) -> None:
    """Overwrite every parameter of `module` with `param_value(name, shape)` (state_dict names)."""
    state = {k: param_value(k, tuple(v.shape)) for k, v in module.state_dict().items()}
    module.load_state_dict(state, strict=True)


def latents() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw latents (B, L+1, NUM_RAW, D) and ActionQuery latents (B, L+1, NUM_QUERIES, D), float32."""
    raw = _rng("raw_latents").standard_normal((BATCH, NUM_LAYERS + 1, NUM_RAW, HIDDEN))
    aq = _rng("action_query_latents").standard_normal((BATCH, NUM_LAYERS + 1, NUM_QUERIES, HIDDEN))
    return torch.tensor(raw, dtype=torch.float32), torch.tensor(aq, dtype=torch.float32)


def proprio() -> torch.Tensor:
    """Normalised proprio states (B, 8) in [-1, 1]."""
    return torch.tensor(_rng("proprio").uniform(-1, 1, (BATCH, PROPRIO_DIM)), dtype=torch.float32)


def head_noise() -> torch.Tensor:
    """A start-noise tensor (8, 7 * D) for the head's training path, N(0, 0.02)."""
    return torch.tensor(0.02 * _rng("head_noise").standard_normal((8, 7 * HIDDEN)), dtype=torch.float32)


# End-to-end fixture: a LIBERO-Spatial-style task, its dataset statistics and one observation.
UNNORM_KEY = "libero_spatial_no_noops"
INSTRUCTION = "Pick up the black bowl between the plate and the ramekin and place it on the plate"
# Released folders store the DINO / SigLIP statistics rounded to bf16 (upstream's preprocessor_config.json).
BF16_DINO_MEAN, BF16_DINO_STD = [0.484375, 0.455078125, 0.40625], [0.228515625, 0.2236328125, 0.224609375]


def norm_stats() -> dict:
    """`dataset_statistics.json` of the end-to-end folder: q01/q99 bounds, gripper (last action dim) unmasked."""
    rng = np.random.default_rng(11)
    a01, a99 = -rng.uniform(0.5, 1.0, 7), rng.uniform(0.5, 1.0, 7)
    p01, p99 = -rng.uniform(0.1, 0.4, 8), rng.uniform(0.1, 0.4, 8)
    return {UNNORM_KEY: {
        "action": {"mean": [0.0] * 7, "std": [1.0] * 7, "q01": a01.tolist(), "q99": a99.tolist(),
                   "min": (a01 - 0.1).tolist(), "max": (a99 + 0.1).tolist(), "mask": [True] * 6 + [False]},
        "proprio": {"mean": [0.0] * 8, "std": [1.0] * 8, "q01": p01.tolist(), "q99": p99.tolist(),
                    "min": (p01 - 0.1).tolist(), "max": (p99 + 0.1).tolist()},
        "num_transitions": 100, "num_trajectories": 2}}


def observation() -> tuple[list[np.ndarray], np.ndarray]:
    """Two 256 px frames (third-person, wrist) as the simulator gives them after the 180° rotation, and a raw state."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:256, 0:256]
    frames = []
    for k in range(2):
        base = np.stack([(x * (1 + k) + 30 * np.sin(y / 11)) % 256, (y * 1.7) % 256, ((x + y) * 0.6) % 256], -1)
        frames.append(np.clip(base + rng.integers(-12, 12, base.shape), 0, 255).astype(np.uint8))
    state = rng.uniform(-0.3, 0.3, 8)
    return frames, state
