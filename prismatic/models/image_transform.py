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


def _normalization_affine(normalization: dict | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), float32 (2, 3, 1, 1) each: pixel value = x * scale + bias for uint8 x, per ViT and channel.

    One fused multiply-add per normalisation: (x/255 - mean)/std == x * (1/(255 std)) - mean/std. (addcmul, not
    mul then add: those round differently; tests/data/test_image_fast_paths.py checks every uint8 value.)
    """
    norm = normalization or DEFAULT_NORMALIZATION
    mean = torch.tensor([v for group in norm["mean"] for v in group], dtype=torch.float64)
    std = torch.tensor([v for group in norm["std"] for v in group], dtype=torch.float64)
    if mean.numel() != CHANNELS_PER_IMAGE or std.numel() != CHANNELS_PER_IMAGE:
        raise ValueError(f"normalisation needs 3 means and 3 stds per ViT, got {norm}")
    scale = (1.0 / (255.0 * std)).to(device=device, dtype=torch.float32).view(2, 3, 1, 1)
    bias = (-mean / std).to(device=device, dtype=torch.float32).view(2, 3, 1, 1)
    return scale, bias


def planar_images_to_pixel_values(images: torch.Tensor, normalization: dict | None = None) -> torch.Tensor:
    """uint8 channel-planar images (B, N, 3, H, W) -> float32 pixel values (B, 6N, H, W) on the images' device.

    The training batch carries its images as uint8 (8x fewer bytes from the loader's workers and to the device); this
    normalises them where the model runs. The one normalisation of the project: `images_to_pixel_values`
    (inference pre-processing) is this function on one sample.
    """
    if images.dtype != torch.uint8 or images.ndim != 5 or images.shape[2] != 3:
        raise ValueError(f"expected uint8 images of shape (B, N, 3, H, W), got {tuple(images.shape)} {images.dtype}")
    batch, num, _, height, width = images.shape
    scale, bias = _normalization_affine(normalization, images.device)
    x = images.reshape(batch * num, 3, height, width).contiguous().to(torch.float32)
    out = torch.empty((batch * num, 2, 3, height, width), dtype=torch.float32, device=images.device)
    for vit in range(2):
        torch.addcmul(bias[vit], x, scale[vit], out=out[:, vit])
    return out.view(batch, CHANNELS_PER_IMAGE * num, height, width)


def batch_pixel_values(batch: dict, device: torch.device | str) -> torch.Tensor:
    """The model's pixel values of a batch dict, on `device`: its float `pixel_values` (inference pre-processing,
    or a batch already moved by `train_step.to_device`) or else its uint8 `images` normalised there."""
    if "pixel_values" in batch:
        return batch["pixel_values"].to(device)
    if "images" in batch:
        return planar_images_to_pixel_values(batch["images"].to(device))
    raise KeyError(f"batch has neither 'pixel_values' nor 'images' (keys present: {sorted(batch)})")


def images_to_pixel_values(images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
                           normalization: dict | None = None) -> torch.Tensor:
    """Convert uint8 images (N, H, W, 3) (or a list of (H, W, 3)) to float32 pixel values (6N, H, W).

    normalization: {"mean": (dino, siglip), "std": (dino, siglip)}; default ImageNet for DINO, 0.5 for SigLIP.
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
    return planar_images_to_pixel_values(array.permute(0, 3, 1, 2).unsqueeze(0), normalization)[0]
