"""Image geometry shared by training, caching and inference: resize, JPEG round trip and the evaluation center crop.

Training augmentation (random crop + colour jitter) lives with the data pipeline; everything a deployed policy
must reproduce exactly lives here, so the evaluation path and the training path cannot drift apart.

One image path, upstream VLA-Adapter's, everywhere:
- training: stored JPEG -> decode (TF's decoder settings) -> `resize_image` to 224 (TF lanczos3 + antialias, round,
  clip; dlimp's `resize_image` in upstream's RLDS pipeline);
- evaluation (`policy_view`, upstream's `resize_image_for_policy`): raw camera frame -> JPEG encode/decode at quality
  95 with TF's settings -> the same resize (RLDS stored JPEG frames, so the policy sees what it was trained on);
- then, for models trained with crop augmentation, a center crop of area 0.9 resampled bilinearly the way
  TensorFlow's `crop_and_resize` does.
Each step equals TensorFlow's result bit for bit (tests/data/test_image_ops_tf.py runs TensorFlow side by side).
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
from PIL import Image

from prismatic.data import lanczos

IMAGE_SIZE = 224
CROP_AREA_SCALE = 0.9  # upstream's random-resized-crop scale; eval uses the same area as a center crop
JPEG_QUALITY = 95  # TensorFlow's encode_jpeg default, used by upstream's evaluation


def jpeg_roundtrip(image: np.ndarray, quality: int = JPEG_QUALITY) -> np.ndarray:
    """Encode a uint8 (H, W, 3) image as JPEG and decode it again, bit-identical to TensorFlow's
    `decode_image(encode_jpeg(image))` (libjpeg 4:2:0 encode; integer-fast IDCT, smooth upsampling on decode)."""
    image = _check_uint8_rgb(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=int(quality))
    return simplejpeg.decode_jpeg(buffer.getvalue(), fastdct=True, fastupsample=False)


def _check_uint8_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got shape {image.shape} dtype {image.dtype}")
    return image


def resize_image(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), equal to TF's `resize(lanczos3, antialias=True)` + round + clip.
    A frame already at `size` is returned as it is (TF's resize at scale 1 is the identity after rounding)."""
    image = _check_uint8_rgb(image)
    if image.shape[:2] == (size, size):
        return image
    return lanczos.resize_hwc(image, size)


def resize_image_planes(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """`resize_image` as channel-planar uint8 (3, size, size): the training batch's layout, without a transpose."""
    image = _check_uint8_rgb(image)
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image.transpose(2, 0, 1))
    return lanczos.resize_planes(image, size)


def policy_view(frame: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A raw camera frame as upstream's evaluation feeds it to the policy (`resize_image_for_policy`): JPEG round
    trip at quality 95, then the lanczos3 resize to (size, size, 3). Always round-trips, as upstream does."""
    return lanczos.resize_hwc(jpeg_roundtrip(frame), size)


def _bilinear_axis(n_in: int, n_out: int, start: np.float32, stop: np.float32
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (floor, ceil) and weights along one axis, in float32 as TF's crop_and_resize kernel computes
    them: in = start * (n_in - 1) + i * (stop - start) * (n_in - 1) / (n_out - 1)."""
    scale = np.float32((stop - start) * np.float32(n_in - 1)) / np.float32(n_out - 1)
    coords = (start * np.float32(n_in - 1) + np.arange(n_out, dtype=np.float32) * scale).astype(np.float32)
    low = np.floor(coords).astype(np.int64)
    high = np.ceil(coords).astype(np.int64)
    return low, high, (coords - low).astype(np.float32)


def crop_resize_bilinear(image: np.ndarray, area_scale: float = CROP_AREA_SCALE, top_frac: float = 0.5,
                         left_frac: float = 0.5, size: int = IMAGE_SIZE) -> np.ndarray:
    """A square box of relative side sqrt(area_scale), placed at (top_frac, left_frac) of the free margin (0.5, 0.5 =
    centered), resampled bilinearly to (size, size) with TensorFlow `crop_and_resize` semantics on [0, 1] floats,
    then back to uint8 (x * 255.5, truncated). The evaluation center crop and the training random crop share it."""
    planes = crop_resize_bilinear_planes(image, area_scale, top_frac, left_frac, size)
    return np.ascontiguousarray(planes.transpose(1, 2, 0))


def crop_resize_bilinear_planes(image: np.ndarray, area_scale: float = CROP_AREA_SCALE, top_frac: float = 0.5,
                                left_frac: float = 0.5, size: int = IMAGE_SIZE) -> np.ndarray:
    """`crop_resize_bilinear` of a uint8 (H, W, 3) image as uint8 colour planes (3, size, size).

    The same float32 operations per output value as TF's kernel (top = tl + (tr - tl) * xw, bottom likewise,
    out = top + (bottom - top) * yw), computed separably: the horizontal lerp once per source row (every output
    row reuses it), and every gather along the leading axis of a contiguous array (transposes instead of
    element-wise column gathers, which cost 10x more in numpy).
    """
    image = _check_uint8_rgb(image)
    if not 0.0 < area_scale <= 1.0:
        raise ValueError(f"area_scale must be in (0, 1], got {area_scale}")
    height, width = image.shape[:2]
    side = np.float32(min(max(np.sqrt(np.float32(area_scale)), 0.0), 1.0))
    margin = np.float32(1.0) - side
    y_start = margin / np.float32(2.0) if top_frac == 0.5 else np.float32(margin * np.float32(top_frac))
    x_start = margin / np.float32(2.0) if left_frac == 0.5 else np.float32(margin * np.float32(left_frac))
    top, bottom, y_weight = _bilinear_axis(height, size, y_start, y_start + side)
    left, right, x_weight = _bilinear_axis(width, size, x_start, x_start + side)
    row0, col0 = int(top.min()), int(left.min())
    box = image[row0:int(bottom.max()) + 1, col0:int(right.max()) + 1]
    left, right, top, bottom = left - col0, right - col0, top - row0, bottom - row0
    x_weight, y_weight = x_weight[:, None], y_weight[:, None]
    result = np.empty((3, size, size), dtype=np.uint8)
    for c in range(3):  # one plane at a time: its temporaries stay in the L2 cache
        columns = box[:, :, c].T.astype(np.float32, order="C")  # (cols, rows): a column is a contiguous row
        columns *= np.float32(1.0 / 255.0)
        lerp = columns[left]
        step = columns[right]
        step -= lerp
        step *= x_weight
        lerp += step  # (size, rows): every source row, lerped horizontally
        lerp_rows = np.ascontiguousarray(lerp.T)  # (rows, size)
        out = lerp_rows[top]
        step = lerp_rows[bottom]
        step -= out
        step *= y_weight
        out += step
        np.clip(out, 0.0, 1.0, out=out)
        out *= np.float32(255.5)
        result[c] = out  # truncating cast, as astype(uint8)
    return result


def center_crop(image: np.ndarray, area_scale: float = CROP_AREA_SCALE, size: int = IMAGE_SIZE) -> np.ndarray:
    """Evaluation view of a model trained with crop augmentation, exactly as upstream computes it (TF
    `crop_and_resize` of the central box of area `area_scale`; bit-identical to TensorFlow)."""
    return crop_resize_bilinear(image, area_scale, 0.5, 0.5, size)
