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


DEFAULT_NORMALIZATION = {"mean": (DINO_MEAN, SIGLIP_MEAN), "std": (DINO_STD, SIGLIP_STD)}


def normalization_from_preprocessor_config(config: dict) -> dict[str, tuple[tuple[float, ...], ...]]:
    """{"mean": (dino, siglip), "std": (dino, siglip)} from an HF `preprocessor_config.json` of a released folder.

    Released folders store the DINO/SigLIP statistics rounded to bf16 under `tvf_normalize_params`; the deployed
    policy must normalise with those values, not with the textbook ImageNet numbers.
    """
    params = config.get("tvf_normalize_params")
    if params is None:
        if "means" in config and "stds" in config:
            return {"mean": tuple(tuple(map(float, m)) for m in config["means"]),
                    "std": tuple(tuple(map(float, s)) for s in config["stds"])}
        raise ValueError("preprocessor config has neither 'tvf_normalize_params' nor 'means'/'stds'")
    if len(params) != 2:
        raise ValueError(f"expected normalisation for 2 ViTs (DINO, SigLIP), got {len(params)}")
    return {"mean": tuple(tuple(map(float, p["mean"])) for p in params),
            "std": tuple(tuple(map(float, p["std"])) for p in params)}


def images_to_pixel_values(images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
                           normalization: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Convert uint8 images (N, H, W, 3) (or a list of (H, W, 3)) to float32 pixel values (6N, H, W).

    normalization: {"mean": (dino, siglip), "std": (dino, siglip)}; default ImageNet for DINO, 0.5 for SigLIP.
    out: a contiguous float32 (6N, H, W) tensor to write into (the collator passes its batch slice: no stack copy).
    Channel-planar inputs (`images.transpose(0, 3, 1, 2)` contiguous, as the training loader makes them) are read
    without a transpose.
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
    array = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if array.ndim == 3:
        array = array.unsqueeze(0)
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W, 3), got {tuple(array.shape)}")
    if array.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got dtype {array.dtype}")
    num, height, width = array.shape[0], array.shape[1], array.shape[2]
    shape = (CHANNELS_PER_IMAGE * num, height, width)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=array.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of shape {shape}, got {tuple(out.shape)} "
                         f"{out.dtype}")
    # One fused multiply-add per normalisation: (x/255 - mean)/std == x * (1/(255 std)) - mean/std. (addcmul, not
    # mul then add: those round differently; tests/data/test_image_fast_paths.py checks every uint8 value.)
    norm = normalization or DEFAULT_NORMALIZATION
    mean = torch.tensor([v for group in norm["mean"] for v in group], dtype=torch.float64)
    std = torch.tensor([v for group in norm["std"] for v in group], dtype=torch.float64)
    if mean.numel() != CHANNELS_PER_IMAGE or std.numel() != CHANNELS_PER_IMAGE:
        raise ValueError(f"normalisation needs 3 means and 3 stds per ViT, got {norm}")
    scale = (1.0 / (255.0 * std)).to(device=out.device, dtype=torch.float32).view(2, 3, 1, 1)
    bias = (-mean / std).to(device=out.device, dtype=torch.float32).view(2, 3, 1, 1)
    planes = array.permute(0, 3, 1, 2)  # (N, 3, H, W) in [0, 255]
    x = torch.empty((3, height, width), dtype=torch.float32, device=out.device)
    fused = out.view(num, 2, 3, height, width)  # channels [dino RGB, siglip RGB] per image
    for n in range(num):
        x.copy_(planes[n])
        for vit in range(2):
            torch.addcmul(bias[vit], x, scale[vit], out=fused[n, vit])
    return out
