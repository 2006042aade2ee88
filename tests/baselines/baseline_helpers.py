"""Helpers of the baseline / drift tests (a uniquely named module: `conftest` is ambiguous across test folders)."""

from __future__ import annotations

import torch

from prismatic.models.configuration_vla import make_vla_config

DATASET = "synthetic_libero_no_noops"


def tiny_batch(batch: int = 2, seed: int = 0, num_images: int = 1, prompt_len: int = 7):
    """(pixel_values, input_ids, attention_mask) with right padding on the last sample."""
    g = torch.Generator().manual_seed(seed)
    cfg = make_vla_config("tiny")
    ids = torch.randint(5, 40, (batch, prompt_len), generator=g)
    ids[:, 0] = cfg.text_config.bos_token_id
    mask = torch.ones(batch, prompt_len, dtype=torch.bool)
    mask[-1, prompt_len - 2:] = False
    return torch.randn(batch, 6 * num_images, 224, 224, generator=g), ids, mask
