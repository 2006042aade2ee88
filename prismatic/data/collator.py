"""Collation of samples into the batch dict every consumer relies on (docs/craft/PROJECT_STRUCTURE.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prismatic.models.image_transform import images_to_pixel_values


class VLACollator:
    """Right-pads prompt ids and stacks everything into the batch dict.

    Output: pixel_values float32 (B, 6N, H, W); input_ids int64 (B, Tp); attention_mask bool (B, Tp); actions
    float32 (B, 8, 7); proprio float32 (B, 8); sample_ids, content_hashes, dataset_names: list[str].
    """

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad token id; set tokenizer.pad_token before building the loader")
        self.pad_token_id = int(pad_token_id)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(s["input_ids"]) for s in samples]
        input_ids = torch.full((len(samples), max(lengths)), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(samples), max(lengths)), dtype=torch.bool)
        for i, s in enumerate(samples):
            input_ids[i, : lengths[i]] = torch.as_tensor(np.asarray(s["input_ids"], dtype=np.int64))
            attention_mask[i, : lengths[i]] = True
        shapes = {s["images"].shape for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"samples carry images of different shapes {sorted(shapes)}")
        return {
            "pixel_values": torch.stack([images_to_pixel_values(s["images"]) for s in samples]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "actions": torch.as_tensor(np.stack([s["actions"] for s in samples]), dtype=torch.float32),
            "proprio": torch.as_tensor(np.stack([s["proprio"] for s in samples]), dtype=torch.float32),
            "sample_ids": [s["sample_id"] for s in samples],
            "content_hashes": [s["content_hash"] for s in samples],
            "dataset_names": [s["dataset_name"] for s in samples],
        }
