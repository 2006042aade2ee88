"""The evaluation image primitives against TensorFlow itself (the tool upstream's evaluation runs): bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf  # pinned in requirements.txt: the real tool, never skipped

from prismatic.data.image_ops import center_crop, crop_resize_bilinear, jpeg_roundtrip


def _scene(seed: int, size: int = 256) -> np.ndarray:
    """A render-like image: smooth gradients + texture + noise (JPEG on pure noise says little)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = np.stack([(x + 40 * np.sin(y / 9)) % 256, (y * 1.3) % 256, (x * y / 200) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_jpeg_roundtrip_equals_tensorflow(seed):
    image = _scene(seed)
    want = tf.io.decode_image(tf.image.encode_jpeg(image), expand_animations=False, dtype=tf.uint8).numpy()
    got = jpeg_roundtrip(image)
    assert not np.array_equal(got, image)  # the round trip does change pixels
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_center_crop_equals_tensorflow_crop_and_resize(seed):
    image = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    side = tf.reshape(tf.clip_by_value(tf.sqrt(0.9), 0, 1), shape=(1,))
    offset = (1 - side) / 2
    boxes = tf.stack([offset, offset, offset + side, offset + side], axis=1)
    floats = tf.image.convert_image_dtype(tf.convert_to_tensor(image), tf.float32)[None]
    cropped = tf.image.crop_and_resize(floats, boxes, tf.range(1), (224, 224))[0]
    want = tf.image.convert_image_dtype(tf.clip_by_value(cropped, 0, 1), tf.uint8, saturate=True).numpy()
    np.testing.assert_array_equal(center_crop(image), want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_crop_equals_tensorflow_crop_and_resize(seed):
    """The training crop (box of area 0.9 placed at a random fraction of the margin) is TF's crop_and_resize too."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    floats = tf.image.convert_image_dtype(tf.convert_to_tensor(image), tf.float32)[None]
    for top, left in rng.random((4, 2)).astype(np.float32):
        side = np.float32(np.sqrt(np.float32(0.9)))
        y0, x0 = np.float32((1 - side) * top), np.float32((1 - side) * left)
        boxes = tf.constant([[y0, x0, y0 + side, x0 + side]], tf.float32)
        cropped = tf.image.crop_and_resize(floats, boxes, tf.range(1), (224, 224))[0]
        want = tf.image.convert_image_dtype(tf.clip_by_value(cropped, 0, 1), tf.uint8, saturate=True).numpy()
        np.testing.assert_array_equal(crop_resize_bilinear(image, 0.9, float(top), float(left)), want)
