"""Evaluation precision: upstream evaluates the VLA and the head in bf16 on GPU; on CPU fp32 is the default."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """'auto' (or None) -> bf16 on CUDA, fp32 elsewhere; 'float32' / 'bfloat16' as named."""
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: choose one of {list(DTYPE_CHOICES)}")
    return DTYPES[name]

