"""Pixel normalisation for the fused DINOv2 + SigLIP backbone: 6 channels per image.

Images arrive as uint8 (H, W, 3) arrays already resized (and cropped/augmented) by the data pipeline or by
the inference pre-processing; this module only converts and normalises them, so every caller feeds the
model the same tensor layout: (6 * num_images, H, W), channels [dino RGB, siglip RGB] per image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DINO_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics (DINOv2)
DINO_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
CHANNELS_PER_IMAGE = 6


def images_to_pixel_values(images: np.ndarray | torch.Tensor | Sequence[np.ndarray]) -> torch.Tensor:
    """Convert uint8 images (N, H, W, 3) (or a list of (H, W, 3)) to float32 pixel values (6N, H, W)."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    array = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if array.ndim == 3:
        array = array.unsqueeze(0)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {tuple(array.shape)}")
    if array.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got dtype {array.dtype}")
    # One fused multiply-add per normalisation: (x/255 - mean)/std == x * (1/(255 std)) - mean/std.
    x = array.permute(0, 3, 1, 2).to(torch.float32)  # (N, 3, H, W) in [0, 255]
    mean = torch.tensor(DINO_MEAN + SIGLIP_MEAN, dtype=torch.float64)
    std = torch.tensor(DINO_STD + SIGLIP_STD, dtype=torch.float64)
    scale = (1.0 / (255.0 * std)).to(torch.float32).view(1, 6, 1, 1)
    bias = (-mean / std).to(torch.float32).view(1, 6, 1, 1)
    fused = torch.addcmul(bias, torch.cat([x, x], dim=1), scale)  # (N, 6, H, W)
    return fused.reshape(-1, *fused.shape[2:]).contiguous()
