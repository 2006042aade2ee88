"""Simulator observation -> policy inputs: camera images and the 8-dim proprio state.

LIBERO renders its cameras upside down relative to the training data, so both images are rotated by 180 degrees
(`img[::-1, ::-1]`), then go through upstream's `resize_image_for_policy`: JPEG round trip at quality 95 (the RLDS
training frames were JPEG) and TF's lanczos3 + antialias resize to 224 px (`image_ops.policy_view`, equal to
TensorFlow's result). The proprio vector is the one stored in the
RLDS `observation/state`: end-effector position (3), end-effector orientation as axis-angle (3), gripper joint
positions (2). The (optional) evaluation center crop is applied by `predict_action(center_crop=True)`, not here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from prismatic.data.image_ops import IMAGE_SIZE, policy_view

THIRD_PERSON_KEY = "agentview_image"
WRIST_KEY = "robot0_eye_in_hand_image"
EEF_POS_KEY = "robot0_eef_pos"
EEF_QUAT_KEY = "robot0_eef_quat"  # (x, y, z, w), robosuite's convention
GRIPPER_QPOS_KEY = "robot0_gripper_qpos"
PROPRIO_DIM = 8


def rotate_180(image: np.ndarray) -> np.ndarray:
    """Rotate an (H, W, C) image by 180 degrees (flip both spatial axes), returned contiguous."""
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    return np.ascontiguousarray(image[::-1, ::-1])


def prepare_image(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """A raw LIBERO camera frame as upstream's evaluation feeds it: rotate 180 degrees, JPEG round trip, lanczos3
    resize to (size, size, 3)."""
    return policy_view(rotate_180(image), size)


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis * angle (3,), with the same conventions as the LIBERO training data.

    The angle is 2 acos(w) with w clipped to [-1, 1] and no sign canonicalisation (so angles lie in [0, 2 pi]);
    a (near) identity rotation maps to zeros.
    """
    q = np.asarray(quat, dtype=np.float64)
    if q.shape != (4,):
        raise ValueError(f"expected a (4,) quaternion (x, y, z, w), got shape {q.shape}")
    w = float(np.clip(q[3], -1.0, 1.0))
    den = math.sqrt(1.0 - w * w)
    if math.isclose(den, 0.0):
        return np.zeros(3)
    return q[:3] * 2.0 * math.acos(w) / den


def extract_proprio(obs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Proprio state (8,) float32 = [eef pos (3), eef axis-angle (3), gripper qpos (2)]."""
    missing = [k for k in (EEF_POS_KEY, EEF_QUAT_KEY, GRIPPER_QPOS_KEY) if k not in obs]
    if missing:
        raise KeyError(f"observation lacks {missing} (keys present: {sorted(obs)})")
    parts = [np.asarray(obs[EEF_POS_KEY], dtype=np.float64).reshape(-1),
             quat_to_axis_angle(obs[EEF_QUAT_KEY]),
             np.asarray(obs[GRIPPER_QPOS_KEY], dtype=np.float64).reshape(-1)]
    state = np.concatenate(parts)
    if state.shape != (PROPRIO_DIM,):
        raise ValueError(f"proprio has shape {state.shape}, expected ({PROPRIO_DIM},): parts "
                         f"{[p.shape for p in parts]}")
    return state.astype(np.float32)


def policy_images(obs: Mapping[str, np.ndarray], num_images: int, size: int = IMAGE_SIZE) -> list[np.ndarray]:
    """The policy's input views in training order: [third-person] or [third-person, wrist], as `prepare_image`."""
    keys = {1: [THIRD_PERSON_KEY], 2: [THIRD_PERSON_KEY, WRIST_KEY]}.get(num_images)
    if keys is None:
        raise ValueError(f"num_images_in_input must be 1 (third-person) or 2 (+ wrist), got {num_images}")
    missing = [k for k in keys if k not in obs]
    if missing:
        raise KeyError(f"observation lacks camera images {missing} (keys present: {sorted(obs)})")
    return [prepare_image(obs[k], size) for k in keys]
