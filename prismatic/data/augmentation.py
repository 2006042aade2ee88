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
import torch

from prismatic.data.image_ops import CROP_AREA_SCALE, IMAGE_SIZE, crop_resize_bilinear_planes


@dataclass(frozen=True)
class AugmentationConfig:
    crop_area: float = CROP_AREA_SCALE
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05


DEFAULT_AUGMENTATION = AugmentationConfig()


def _histogram(plane: np.ndarray) -> np.ndarray:
    """Counts of the 256 values of a contiguous uint8 plane (int64). torch.bincount is 3x faster than numpy's on
    one thread (DataLoader workers run single-threaded), but with several torch threads it spins an OpenMP pool,
    up to 100x slower on a busy machine: then numpy's. Same counts either way."""
    if torch.get_num_threads() == 1:
        return torch.bincount(torch.from_numpy(plane).view(-1), minlength=256).numpy()
    return np.bincount(plane.ravel(), minlength=256)


def adjust_saturation_hue(planes: np.ndarray, saturation_factor: float, hue_delta: float,
                          out: np.ndarray | None = None) -> np.ndarray:
    """HSV saturation scale (clipped to 1) and hue rotation (in turns) of float32 RGB planes (3, H, W) in [0, 1].

    Works in RGB with the HSV identities (v and chroma c = v * s; rgb = v - c * w_n(h)) on contiguous planes:
    several times faster than converting to an HSV array and back, with the same result. Every step writes into
    a buffer allocated once per call (fresh large arrays cost page faults); `out` may be `planes` itself.
    """
    r, g, b = planes[0], planes[1], planes[2]
    v = np.maximum(r, g)
    np.maximum(v, b, out=v)
    chroma = np.minimum(r, g)
    np.minimum(chroma, b, out=chroma)
    np.subtract(v, chroma, out=chroma)
    hue = np.maximum(chroma, np.float32(1e-12))
    np.divide(np.float32(1.0), hue, out=hue)  # 1 / chroma for now
    is_r = v == r
    is_g = v == g
    is_g &= ~is_r
    is_b = is_r | is_g
    np.logical_not(is_b, out=is_b)
    # hue in sextants, [-1, 1] around the max channel: (g - b), (b - r) or (r - g) over chroma. The case is
    # selected by multiplying with the 0/1 masks and summing: exact (x * 1 = x, x + 0 = x) and, unlike np.where
    # or masked ufuncs on a random mask, branch-free.
    diff = np.subtract(g, b)
    diff *= is_r
    term = np.subtract(b, r)
    term *= is_g
    diff += term
    np.subtract(r, g, out=term)
    term *= is_b
    diff += term
    hue *= diff
    # + 2 (max is g) or 4 (max is b) + 6 (keeps it positive) + the rotation, summed in this order as before
    np.multiply(is_g, np.float32(2.0), out=term)
    diff = np.multiply(is_b, np.float32(4.0), out=diff)
    term += diff
    term += np.float32(6.0 + 6.0 * hue_delta)
    hue += term
    chroma *= np.float32(saturation_factor)
    np.minimum(chroma, v, out=chroma)
    if out is None:
        out = np.empty_like(planes)
    k, floor = diff, term
    for i, n in enumerate((5.0, 3.0, 1.0)):
        np.add(hue, np.float32(n), out=k)
        np.multiply(k, np.float32(1.0 / 6.0), out=floor)
        np.floor(floor, out=floor)
        floor *= np.float32(6.0)
        k -= floor
        np.subtract(np.float32(4.0), k, out=floor)
        np.minimum(k, floor, out=k)
        np.clip(k, 0.0, 1.0, out=k)
        k *= chroma
        np.subtract(v, k, out=out[i])
    return out


def augment_image(image: np.ndarray, rng: np.random.Generator, config: AugmentationConfig = DEFAULT_AUGMENTATION,
                  size: int = IMAGE_SIZE) -> np.ndarray:
    """Randomly crop and colour-jitter a uint8 (H, W, 3) image; returns uint8 (size, size, 3).

    The result is a channel-planar view (`.transpose(2, 0, 1)` is contiguous): the collator wants planes, and an
    interleaved copy would cost more than all the colour jitter.
    """
    top, left, bright, contrast, sat, hue = rng.random(6)
    planes = crop_resize_bilinear_planes(image, config.crop_area, float(top), float(left), size)
    # Brightness and contrast are per-channel maps of the uint8 value: apply them as 256-entry lookup tables.
    # The contrast pivot (per-channel mean after brightness) comes from the channel histograms.
    levels = np.arange(256, dtype=np.float64) / 255.0
    bright_lut = np.clip(levels + (2.0 * bright - 1.0) * config.brightness, 0.0, 1.0)
    factor = config.contrast[0] + contrast * (config.contrast[1] - config.contrast[0])
    x = np.empty(planes.shape, dtype=np.float32)
    for c, channel in enumerate(planes):
        mean = float(_histogram(channel) @ bright_lut) / channel.size
        lut = np.clip((bright_lut - mean) * factor + mean, 0.0, 1.0).astype(np.float32)
        np.take(lut, channel, out=x[c], mode="clip")  # mode="clip": no bounds-check copy (uint8 is in range)
    s_factor = config.saturation[0] + sat * (config.saturation[1] - config.saturation[0])
    x = adjust_saturation_hue(x, s_factor, (2.0 * hue - 1.0) * config.hue, out=x)
    # No clip needed here: v - chroma * w with v in [0, 1], 0 <= chroma <= v and w in [0, 1] stays in [0, v].
    x *= np.float32(255.0)
    np.rint(x, out=x)
    return x.astype(np.uint8).transpose(1, 2, 0)
