"""TensorFlow's `tf.image.resize(..., method="lanczos3", antialias=True)`, reproduced bit for bit without TensorFlow.

Upstream VLA-Adapter resizes every frame with TF lanczos3 + antialias: in training (dlimp's `resize_image` in the
RLDS pipeline, 256 -> 224) and in evaluation (`resize_image_for_policy`), then rounds half to even, clips to [0, 255]
and casts to uint8. TF implements that resize as its `ScaleAndTranslate` kernel: per output row (and column) a span
of source pixels with float32 weights `lanczos3(|source + 0.5 - sample| / kernel_scale)` normalised to sum 1, applied
as a row pass then a column pass, each accumulated in float32 in span order starting from 0.

Here the spans and weights are computed once per (input, output) size with the same float32 operations, and the two
passes run in a small numba kernel with the same accumulation order, so the result equals TensorFlow's (tested against
TensorFlow itself on noise, rendered-like scenes and real-size camera frames). The kernel returns channel-planar
uint8 (3, size, size), the layout the training batch carries; `resize_hwc` gives the (size, size, 3) view.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import lru_cache

import numba
import numpy as np

LANCZOS_RADIUS = 3.0
_PI = np.float32(3.14159265359)  # TF's constant in sampling_kernels.h, as a float


def _load_sinf() -> Callable[[float], float] | None:
    path = ctypes.util.find_library("m")
    try:
        sinf = ctypes.CDLL(path).sinf if path else None
    except (OSError, AttributeError):
        return None
    if sinf is not None:
        sinf.restype, sinf.argtypes = ctypes.c_float, [ctypes.c_float]
    return sinf


_C_SINF = _load_sinf()


def _sinf(x: np.ndarray) -> np.ndarray:
    """The platform C library's float sine, the one TF's `std::sin(float)` calls: numpy's float32 sine and a float64
    sine rounded to float32 each differ from glibc's sinf by an ulp on ~1% of the weights (then, rarely, a pixel)."""
    if _C_SINF is None:  # no C math library to load: the float64 sine rounded, an ulp off on a few weights
        return np.sin(x.astype(np.float64)).astype(np.float32)
    return np.array([_C_SINF(float(v)) for v in np.ravel(x)], dtype=np.float32).reshape(np.shape(x))


def _lanczos3(x: np.ndarray) -> np.ndarray:
    """TF's Lanczos3 kernel in float32: 3 sin(pi x) sin(pi x / 3) / (pi^2 x^2), 1 near 0, 0 beyond the radius."""
    x = np.abs(x).astype(np.float32)
    radius = np.float32(LANCZOS_RADIUS)
    with np.errstate(divide="ignore", invalid="ignore"):
        value = radius * _sinf(_PI * x) * _sinf(_PI * x / radius) / (_PI * _PI * x * x)
    value = np.where(x > radius, np.float32(0.0), value)
    return np.where(x <= np.float32(1e-3), np.float32(1.0), value).astype(np.float32)


@lru_cache(maxsize=16)
def lanczos3_spans(input_size: int, output_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Source start index (output_size,) int64 and weights (output_size, span) float32 of TF's antialiased lanczos3
    resize along one axis (scale = output / input, no translation). Weights past the image edge are 0."""
    if input_size < 1 or output_size < 1:
        raise ValueError(f"sizes must be positive, got input {input_size}, output {output_size}")
    scale = np.float32(output_size) / np.float32(input_size)
    inv_scale = np.float32(1.0 / float(scale))  # TF: `1.0 / scale` in double, stored as float
    kernel_scale = max(inv_scale, np.float32(1.0))
    reach = np.float32(np.float32(LANCZOS_RADIUS) * kernel_scale)
    span = min(2 * int(np.ceil(reach)) + 1, input_size)
    inv_kernel_scale = np.float32(np.float32(1.0) / kernel_scale)
    starts = np.zeros(output_size, dtype=np.int64)
    weights = np.zeros((output_size, span), dtype=np.float32)
    for out in range(output_size):
        sample = np.float32(np.float32(out + 0.5) * inv_scale)
        if sample < 0 or sample > input_size:  # TF leaves such a span empty (never the case without translation)
            continue
        start = int(np.ceil(np.float32(sample - reach - np.float32(0.5))))
        end = int(np.floor(np.float32(sample + reach - np.float32(0.5))))
        start = min(max(start, 0), input_size - 1)
        end = min(max(end, 0), input_size - 1) + 1
        positions = (np.arange(start, end, dtype=np.float32) + np.float32(0.5) - sample).astype(np.float32)
        kernel = _lanczos3((positions * inv_kernel_scale).astype(np.float32))
        total = np.float32(0.0)
        for value in kernel:  # sequential float32 sum, as TF's loop
            total = np.float32(total + value)
        if abs(total) >= np.float32(1000.0) * np.finfo(np.float32).tiny:
            weights[out, : end - start] = kernel * np.float32(np.float32(1.0) / total)
        starts[out] = start
    weights.setflags(write=False)
    starts.setflags(write=False)
    return starts, weights


@numba.njit(cache=True, nogil=True)
def _resample_rows(source, starts, weights):  # pragma: no cover - compiled
    """out[i, :] = sum_j weights[i, j] * source[starts[i] + j, :], accumulated in float32 from 0 in span order (TF's
    GatherRows), returned transposed (columns, out rows) so the next pass reads contiguous rows again."""
    count_in, width = source.shape
    count_out, span = weights.shape
    out_t = np.empty((width, count_out), np.float32)
    row = np.empty(width, np.float32)
    for i in range(count_out):
        start = starts[i]
        row[:] = np.float32(0.0)
        for j in range(min(start + span, count_in) - start):
            weight = weights[i, j]
            for x in range(width):
                row[x] += weight * source[start + j, x]
        for x in range(width):
            out_t[x, i] = row[x]
    return out_t


@numba.njit(cache=True, nogil=True)
def _resize_planes(image, row_starts, row_weights, col_starts, col_weights):  # pragma: no cover - compiled
    height, width, channels = image.shape
    out = np.empty((channels, row_weights.shape[0], col_weights.shape[0]), np.uint8)
    plane = np.empty((height, width), np.float32)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                plane[y, x] = np.float32(image[y, x, c])
        # rows, then columns (TF's order); the second pass's output comes back (out_h, out_w)
        resized = _resample_rows(_resample_rows(plane, row_starts, row_weights), col_starts, col_weights)
        for y in range(resized.shape[0]):
            for x in range(resized.shape[1]):
                value = np.round(resized[y, x])  # half to even, as tf.round
                out[c, y, x] = np.uint8(min(max(value, np.float32(0.0)), np.float32(255.0)))
    return out


def resize_planes(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (3, size, size): TF lanczos3 + antialias resize, round, clip, cast."""
    row_starts, row_weights = lanczos3_spans(image.shape[0], int(size))
    col_starts, col_weights = lanczos3_spans(image.shape[1], int(size))
    return _resize_planes(np.ascontiguousarray(image), row_starts, row_weights, col_starts, col_weights)


def resize_hwc(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), the same values as `resize_planes`."""
    return np.ascontiguousarray(resize_planes(image, size).transpose(1, 2, 0))
