"""Image geometry shared by training, caching and inference: resize and the evaluation center crop.

Training augmentation (random crop + colour jitter) lives with the data pipeline; everything a deployed policy
must reproduce exactly lives here, so the evaluation path and the training path cannot drift apart.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
CROP_AREA_SCALE = 0.9  # upstream's random-resized-crop scale; eval uses the same area as a center crop


def resize_image(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Antialiased Lanczos resize of a uint8 (H, W, 3) image to (size, size, 3)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got shape {image.shape} dtype {image.dtype}")
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))


def crop_box(height: int, width: int, area_scale: float, top_frac: float = 0.5, left_frac: float = 0.5
             ) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of a square-aspect crop covering `area_scale` of the image.

    top_frac/left_frac in [0, 1] place the crop (0.5, 0.5 = centered); random crops draw them uniformly.
    """
    if not 0.0 < area_scale <= 1.0:
        raise ValueError(f"area_scale must be in (0, 1], got {area_scale}")
    side = math.sqrt(area_scale)
    crop_h, crop_w = max(1, round(height * side)), max(1, round(width * side))
    top = round((height - crop_h) * top_frac)
    left = round((width - crop_w) * left_frac)
    return top, left, crop_h, crop_w


def crop_and_resize(image: np.ndarray, box: tuple[int, int, int, int], size: int = IMAGE_SIZE) -> np.ndarray:
    """Crop `box` = (top, left, h, w) out of a uint8 image and resize it back to (size, size)."""
    top, left, crop_h, crop_w = box
    return resize_image(np.ascontiguousarray(image[top:top + crop_h, left:left + crop_w]), size)


def center_crop(image: np.ndarray, area_scale: float = CROP_AREA_SCALE, size: int = IMAGE_SIZE) -> np.ndarray:
    """Evaluation view of a model trained with crop augmentation: centered crop of `area_scale`, resized back."""
    h, w = image.shape[:2]
    return crop_and_resize(image, crop_box(h, w, area_scale), size)
