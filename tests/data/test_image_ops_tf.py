"""The image path against TensorFlow itself (the tool upstream's training and evaluation run): bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf  # pinned in requirements.txt: the real tool, never skipped
from PIL import Image
from tf_reference import camera_frame, tf_center_crop, tf_policy_view, tf_resize

from prismatic.data import lanczos
from prismatic.data.image_ops import (
    center_crop,
    crop_resize_bilinear,
    jpeg_roundtrip,
    policy_view,
    resize_image,
    resize_image_planes,
)


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


# ---------------------------------------------------------------------------------------------- resize (lanczos3)
_CAMERAS = [("agentview", 0), ("agentview", 1), ("wrist", 2), ("wrist", 3)]


@pytest.mark.parametrize("camera,seed", _CAMERAS)
def test_resize_equals_tensorflow_lanczos3_on_camera_frames(camera, seed):
    """256 -> 224 (the training loader's resize) equals TF's lanczos3 + antialias + round + clip bit for bit, while
    PIL's Lanczos (the project's resize before) does not: the comparison can tell the two kernels apart."""
    frame = camera_frame(seed, camera)
    want = tf_resize(frame)
    np.testing.assert_array_equal(resize_image(frame), want)
    np.testing.assert_array_equal(resize_image_planes(frame), want.transpose(2, 0, 1))
    pil = np.asarray(Image.fromarray(frame).resize((224, 224), Image.Resampling.LANCZOS))
    assert (pil != want).mean() > 0.01


@pytest.mark.parametrize("shape", [(256, 256, 3), (128, 128, 3), (480, 640, 3), (200, 300, 3), (224, 224, 3)])
def test_resize_equals_tensorflow_on_noise_any_size(shape):
    """Noise (every weight matters), down- and upsampling, non-square input, and 224 itself (TF's resize at scale 1
    is the identity after rounding, which `resize_image`'s early return relies on)."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    np.testing.assert_array_equal(resize_image(image), tf_resize(image))
    np.testing.assert_array_equal(lanczos.resize_hwc(image, 224), tf_resize(image))


@pytest.mark.parametrize("camera,seed", _CAMERAS)
@pytest.mark.parametrize("crop", [False, True])
def test_policy_view_equals_upstream_resize_image_for_policy(camera, seed, crop):
    """The evaluation view of a raw 256 px frame: JPEG round trip + lanczos3 (+ the 0.9 center crop) equals
    upstream's TensorFlow path bit for bit, for both cameras."""
    frame = camera_frame(seed, camera)
    want = tf_policy_view(frame)
    got = policy_view(frame)
    if crop:
        want, got = tf_center_crop(want), center_crop(got)
    np.testing.assert_array_equal(got, want)
    assert (tf_resize(frame) != want).mean() > 0.01  # the JPEG step matters: skipping it would fail


def test_lanczos3_weights_equal_tensorflow():
    """The kernel's weights themselves: TF resizing one-hot columns (width 1, so the column pass is the identity)
    returns its row weights exactly."""
    starts, weights = lanczos.lanczos3_spans(256, 224)
    dense = np.zeros((224, 256), np.float32)
    for row in range(224):
        count = min(int(starts[row]) + weights.shape[1], 256) - int(starts[row])
        dense[row, starts[row]:starts[row] + count] = weights[row, :count]
    one_hot = np.eye(256, dtype=np.float32)[:, :, None, None]
    tf_weights = tf.image.resize(one_hot, (224, 1), method="lanczos3", antialias=True).numpy()[:, :, 0, 0].T
    np.testing.assert_array_equal(dense, tf_weights)
