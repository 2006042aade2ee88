"""Discretised actions as LLM token ids: the training signal of the knowledge-insulation baseline (`--retention_method
ki`, docs/BASELINES.md). Never used at inference: the head produces the actions.

Convention (OpenVLA's ActionTokenizer, read from upstream for its facts): each dimension of a normalised action (the
same [-1, 1] q99 normalisation the L1 head is trained on) is clipped to [-1, 1] and binned uniformly; bins take the
last ids of the tokenizer's vocabulary `V = tokenizer.vocab_size` (the base vocabulary, without added special tokens:
for Qwen2.5 151643, whose last ids are rare BPE merges, not untrained padding rows of the 151936-row embedding), the
LOWEST bin on the LAST id (OpenVLA maps `np.digitize` index k = 1..256 to id V - k).

Difference, on purpose: OpenVLA's 256 edges `linspace(-1, 1, 256)` make 255 intervals plus the lone value x = 1; here
there are 256 equal-width bins of width 2/256 (x = 1 falls in the top bin), as the issue asks:

    bin(x) = min(floor((clip(x, -1, 1) + 1) · 256 / 2), 255),      id(x) = V - 1 - bin(x)
"""

from __future__ import annotations

import torch

ACTION_TOKEN_BINS = 256


def action_bins(actions: torch.Tensor, num_bins: int = ACTION_TOKEN_BINS) -> torch.Tensor:
    """Bin index 0..num_bins-1 (int64, same shape) of each normalised action value; NaN is refused."""
    if not actions.is_floating_point():
        raise TypeError(f"actions must be a float tensor, got {actions.dtype}")
    if bool(torch.isnan(actions).any()):
        raise ValueError("actions contain NaN: cannot bin them into action tokens")
    # float64: the bin edges k/128 - 1 are exact there, so x on an edge goes to the upper bin (as np.digitize)
    scaled = (actions.double().clamp(-1.0, 1.0) + 1.0) * (num_bins / 2.0)
    return scaled.floor().long().clamp_(0, num_bins - 1)


def action_token_ids(actions: torch.Tensor, vocab_size: int, num_bins: int = ACTION_TOKEN_BINS) -> torch.Tensor:
    """Token ids of a batch of action chunks (B, K, A) -> (B, K * A), flattened time-major (step 0 dims 0..A-1, then
    step 1, ...: the order the LLM predicts them in)."""
    if actions.ndim != 3:
        raise ValueError(f"actions must be (B, chunk, action_dim), got shape {tuple(actions.shape)}")
    if vocab_size < num_bins:
        raise ValueError(f"a vocabulary of {vocab_size} ids cannot hold {num_bins} action bins")
    return (vocab_size - 1 - action_bins(actions, num_bins)).flatten(1)
