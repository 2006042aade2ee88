"""Training image augmentation (upstream's recipe), driven by an explicit numpy Generator.

Order: random resized crop (area 0.9, aspect 1, resampled bilinearly back to 224 as TF's crop_and_resize, the same
sampler as the evaluation center crop) -> brightness (+U[-0.2, 0.2]) -> contrast
(x[0.8, 1.2] around the per-channel mean) -> saturation (x[0.8, 1.2]) -> hue (+U[-0.05, 0.05] turns), on [0, 1]
floats, clipped after each step. The caller seeds the Generator from the sample's stream position, so the same sample
gets the same pixels whatever rank or worker produces it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prismatic.data.image_ops import CROP_AREA_SCALE, IMAGE_SIZE, crop_resize_bilinear


@dataclass(frozen=True)
class AugmentationConfig:
    crop_area: float = CROP_AREA_SCALE
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05


DEFAULT_AUGMENTATION = AugmentationConfig()


def adjust_saturation_hue(planes: np.ndarray, saturation_factor: float, hue_delta: float) -> np.ndarray:
    """HSV saturation scale (clipped to 1) and hue rotation (in turns) of float32 RGB planes (3, H, W) in [0, 1].

    Works in RGB with the HSV identities (v and chroma c = v * s; rgb = v - c * w_n(h)) on contiguous planes:
    several times faster than converting to an HSV array and back, with the same result.
    """
    r, g, b = planes[0], planes[1], planes[2]
    v = np.maximum(np.maximum(r, g), b)
    c = v - np.minimum(np.minimum(r, g), b)
    inv = np.float32(1.0) / np.maximum(c, np.float32(1e-12))
    is_r = v == r
    is_g = ~is_r & (v == g)
    is_b = ~(is_r | is_g)
    hue = np.where(is_r, g - b, np.where(is_g, b - r, r - g)) * inv  # in sextants, [-1, 1] around the max channel
    hue += is_g * np.float32(2.0) + is_b * np.float32(4.0) + np.float32(6.0 + 6.0 * hue_delta)
    chroma = np.minimum(c * np.float32(saturation_factor), v)
    out = np.empty_like(planes)
    for i, n in enumerate((5.0, 3.0, 1.0)):
        k = hue + np.float32(n)
        k -= np.float32(6.0) * np.floor(k * np.float32(1.0 / 6.0))
        w = np.minimum(k, np.float32(4.0) - k)
        np.clip(w, 0.0, 1.0, out=w)
        out[i] = v - chroma * w
    return out


def augment_image(image: np.ndarray, rng: np.random.Generator, config: AugmentationConfig = DEFAULT_AUGMENTATION,
                  size: int = IMAGE_SIZE) -> np.ndarray:
    """Randomly crop and colour-jitter a uint8 (H, W, 3) image; returns uint8 (size, size, 3)."""
    top, left, bright, contrast, sat, hue = rng.random(6)
    image = crop_resize_bilinear(image, config.crop_area, float(top), float(left), size)
    # Brightness and contrast are per-channel maps of the uint8 value: apply them as 256-entry lookup tables.
    # The contrast pivot (per-channel mean after brightness) comes from the channel histograms.
    levels = np.arange(256, dtype=np.float64) / 255.0
    bright_lut = np.clip(levels + (2.0 * bright - 1.0) * config.brightness, 0.0, 1.0)
    factor = config.contrast[0] + contrast * (config.contrast[1] - config.contrast[0])
    x = np.empty((3, *image.shape[:2]), dtype=np.float32)
    for c in range(3):
        channel = np.ascontiguousarray(image[:, :, c])
        mean = float(np.bincount(channel.ravel(), minlength=256) @ bright_lut) / channel.size
        lut = np.clip((bright_lut - mean) * factor + mean, 0.0, 1.0).astype(np.float32)
        x[c] = lut[channel]
    s_factor = config.saturation[0] + sat * (config.saturation[1] - config.saturation[0])
    x = adjust_saturation_hue(x, s_factor, (2.0 * hue - 1.0) * config.hue)
    np.clip(x, 0.0, 1.0, out=x)
    return np.ascontiguousarray(np.rint(x * np.float32(255.0)).astype(np.uint8).transpose(1, 2, 0))
