"""Collation of samples into the batch dict every consumer relies on (docs/craft/PROJECT_STRUCTURE.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info


def _empty_batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor for a batch; in a DataLoader worker it lives in shared memory from the start, as torch's default
    collate does, so handing the batch to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(math.prod(shape), device="cpu")
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


class VLACollator:
    """Right-pads prompt ids and stacks everything into the batch dict.

    Output: images uint8 (B, N, 3, H, W), channel-planar; input_ids int64 (B, Tp); attention_mask bool (B, Tp);
    actions float32 (B, 8, 7); proprio float32 (B, 8); sample_ids, content_hashes, dataset_names: list[str].
    The images stay uint8 until the device: `train_step.to_device` (or `image_transform.batch_pixel_values`)
    normalises them there into the model's float32 `pixel_values` (B, 6N, H, W). A float batch would be 8x the
    bytes, written by the workers and copied to the device.
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
        num, height, width, _ = samples[0]["images"].shape
        images = _empty_batch_tensor((len(samples), num, 3, height, width), torch.uint8)
        for i, s in enumerate(samples):
            image = np.asarray(s["images"])
            if image.dtype != np.uint8:
                raise ValueError(f"sample {s.get('sample_id')} carries {image.dtype} images; expected uint8")
            # the pipeline's images are transposed views of planar arrays: this copy reads them without a transpose
            images[i].copy_(torch.from_numpy(image).permute(0, 3, 1, 2))
        return {
            "images": images,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "actions": torch.as_tensor(np.stack([s["actions"] for s in samples]), dtype=torch.float32),
            "proprio": torch.as_tensor(np.stack([s["proprio"] for s in samples]), dtype=torch.float32),
            "sample_ids": [s["sample_id"] for s in samples],
            "content_hashes": [s["content_hash"] for s in samples],
            "dataset_names": [s["dataset_name"] for s in samples],
        }
