"""Deterministic weights and inputs of the upstream-parity fixtures.

The golden numbers in `upstream_golden.json` were produced by running upstream VLA-Adapter's own classes (in a
scratch folder outside this repo) on exactly these tensors; the tests feed the same tensors to this project's
modules. Every tensor is a pure function of (name, shape), so neither side stores weights.
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
