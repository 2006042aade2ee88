"""Upstream VLA-Adapter's image path written with TensorFlow itself (the tool upstream runs), and camera-like frames.

These are the references the project's numpy/numba image path is compared with, never a re-implementation of it:
- `tf_policy_view`: upstream's `resize_image_for_policy` (encode_jpeg -> decode_image -> resize lanczos3 antialias
  -> round, clip, uint8), what its LIBERO evaluation feeds the policy after the 180-degree rotation;
- `tf_decode_resize`: dlimp's RLDS frame (decode_jpeg, the same resize), what upstream trains on;
- `tf_center_crop`: upstream's `center_crop_image` (crop_and_resize of the central 0.9 area).
`camera_frame` draws 256 px frames with what makes resampling and JPEG differ: smooth shading, hard-edged objects,
thin lines, specular highlights and sensor noise, in the look of LIBERO's agentview or wrist camera.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf  # pinned in requirements.txt: the real tool, never skipped


def _to_uint8(image: tf.Tensor) -> np.ndarray:
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8).numpy()


def tf_resize(image: np.ndarray, size: int = 224) -> np.ndarray:
    return _to_uint8(tf.image.resize(image, (size, size), method="lanczos3", antialias=True))


def tf_policy_view(frame: np.ndarray, size: int = 224) -> np.ndarray:
    decoded = tf.io.decode_image(tf.image.encode_jpeg(frame), expand_animations=False, dtype=tf.uint8)
    return tf_resize(decoded, size)


def tf_decode_resize(data: bytes, size: int = 224) -> np.ndarray:
    return tf_resize(tf.io.decode_jpeg(data, channels=3), size)


def tf_center_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    side = tf.reshape(tf.clip_by_value(tf.sqrt(0.9), 0, 1), shape=(1,))
    offset = (1 - side) / 2
    boxes = tf.stack([offset, offset, offset + side, offset + side], axis=1)
    floats = tf.image.convert_image_dtype(tf.convert_to_tensor(image), tf.float32)[None]
    cropped = tf.image.crop_and_resize(floats, boxes, tf.range(1), (size, size))[0]
    return tf.image.convert_image_dtype(tf.clip_by_value(cropped, 0, 1), tf.uint8, saturate=True).numpy()


def camera_frame(seed: int, camera: str = "agentview", size: int = 256, noise: float = 3.0) -> np.ndarray:
    """A uint8 (size, size, 3) frame: shaded floor and wall, a table edge, boxes and discs with hard edges, a thin
    dark line, a highlight and Gaussian sensor noise. `camera="wrist"` is a close-up: larger objects, gripper
    fingers as dark bars at the bottom, vignetting."""
    if camera not in ("agentview", "wrist"):
        raise ValueError(f"camera must be 'agentview' or 'wrist', got {camera!r}")
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    horizon = rng.uniform(0.3, 0.45)
    wall = np.stack([0.75 - 0.2 * y, 0.72 - 0.15 * y, 0.65 - 0.1 * y], -1) * 255
    floor = np.stack([0.55 + 0.3 * (y - horizon), 0.42 + 0.25 * (y - horizon), 0.3 + 0.2 * x], -1) * 255
    image = np.where((y < horizon)[..., None], wall, floor)
    scale = 2.2 if camera == "wrist" else 1.0
    for _ in range(rng.integers(3, 6)):
        colour = rng.uniform(20, 240, 3)
        cy, cx = rng.uniform(horizon, 0.95), rng.uniform(0.05, 0.95)
        h, w = rng.uniform(0.05, 0.15, 2) * scale
        if rng.random() < 0.5:
            mask = (np.abs(y - cy) < h / 2) & (np.abs(x - cx) < w / 2)
            shade = 1.0 - 0.35 * (x - cx + w / 2) / w  # lit from the left
        else:
            mask = (y - cy) ** 2 + (x - cx) ** 2 < (h / 2) ** 2
            shade = 1.0 - 0.5 * np.clip(((y - cy) + (x - cx)) / h, -1, 1) ** 2
        image = np.where(mask[..., None], colour * shade[..., None], image)
    image[np.abs(y - rng.uniform(0.5, 0.9)) < 1.0 / size] *= 0.3  # a one-pixel dark line (a table edge)
    spot = np.exp(-(((y - rng.uniform(0.4, 0.8)) ** 2 + (x - rng.uniform(0.2, 0.8)) ** 2) / 0.002))
    image += 120 * spot[..., None]  # specular highlight, saturating
    if camera == "wrist":
        fingers = (y > 0.8) & ((np.abs(x - 0.3) < 0.06) | (np.abs(x - 0.7) < 0.06))
        image = np.where(fingers[..., None], 25.0, image)
        image *= (1.0 - 0.45 * ((y - 0.5) ** 2 + (x - 0.5) ** 2))[..., None]  # vignetting
    image += rng.normal(0.0, noise, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
