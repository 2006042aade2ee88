"""The TensorFlow of this project's venv reproduces upstream's policy-image resize, golden made on upstream's pinned
TensorFlow 2.15 by upstream's own `resize_image_for_policy` (generate_tf_resize_golden.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from generate_tf_resize_golden import synthetic_frames, tf_resize

from prismatic.data.image_ops import policy_view

GOLDEN = np.load(Path(__file__).with_name("tf_resize_golden.npz"))


def test_golden_is_upstreams_pinned_tensorflow():
    assert str(GOLDEN["tensorflow"]) == "2.15.0"
    assert str(GOLDEN["upstream_commit"]) == "838a36da195daf3e8b8a53520c8c7ce86231b6d9"
    assert GOLDEN["resized"].shape == (3, 224, 224, 3) and GOLDEN["resized"].dtype == np.uint8


def test_project_tensorflow_resize_is_bit_identical_to_pinned_golden():
    """JPEG 95 -> decode -> lanczos3 antialias 224 -> round, clip, uint8: TF 2.21 equals TF 2.15 on every value."""
    got = np.stack([tf_resize(frame) for frame in synthetic_frames()])
    np.testing.assert_array_equal(got, GOLDEN["resized"])


def test_evaluation_view_equals_upstreams_pinned_golden():
    """The project's own image path (no TensorFlow: PIL-encoded JPEG, simplejpeg decode, the numba lanczos3 kernel)
    equals upstream's `resize_image_for_policy` run on its pinned TensorFlow 2.15, on every value."""
    got = np.stack([policy_view(frame) for frame in synthetic_frames()])
    np.testing.assert_array_equal(got, GOLDEN["resized"])
