"""Observation pre-processing and action post-processing against independent computations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from tf_reference import camera_frame, tf_center_crop, tf_policy_view

from LIBERO.action_processing import SETTLE_ACTION, chunk_to_env_actions, gripper_to_env
from LIBERO.obs_processing import (
    extract_proprio,
    policy_images,
    prepare_image,
    quat_to_axis_angle,
    rotate_180,
)
from LIBERO.policy_runner import PolicyRunner
from prismatic.data.normalization import normalize_proprio_for_eval, unnormalize_bounds_q99
from prismatic.models.image_transform import DINO_MEAN, DINO_STD
from prismatic.models.processing_vla import PrismaticProcessor


def test_rotate_180_matches_rot90_twice():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = rotate_180(img)
    np.testing.assert_array_equal(out, np.rot90(img, 2, axes=(0, 1)))
    assert out[0, 0].tolist() == img[-1, -1].tolist() and out.flags["C_CONTIGUOUS"]


@pytest.mark.parametrize("camera,seed", [("agentview", 0), ("wrist", 1)])
def test_prepare_image_is_upstreams_eval_view(camera, seed):
    """A raw 256 px LIBERO frame -> rotate 180 -> upstream's resize_image_for_policy, computed by TensorFlow (JPEG
    round trip, lanczos3 antialias, round, clip): bit for bit."""
    frame = camera_frame(seed, camera)
    out = prepare_image(frame)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, tf_policy_view(np.ascontiguousarray(np.rot90(frame, 2))))


@pytest.mark.parametrize("crop", [False, True])
def test_raw_frames_to_pixel_values_match_upstream(tiny_tokenizer, crop):
    """The whole path an evaluation runs: simulator observation (raw agentview + wrist frames) -> policy_images ->
    the processor (center crop when trained with crop augmentation) -> normalised pixel values, against
    TensorFlow's upstream views normalised in numpy."""
    obs = {"agentview_image": camera_frame(4, "agentview"), "robot0_eye_in_hand_image": camera_frame(5, "wrist")}
    processor = PrismaticProcessor(tiny_tokenizer, num_images=2, center_crop=crop)
    got = processor.preprocess_images(policy_images(obs, 2)).numpy()
    planes = []
    for key in ("agentview_image", "robot0_eye_in_hand_image"):
        view = tf_policy_view(np.ascontiguousarray(obs[key][::-1, ::-1]))
        view = tf_center_crop(view) if crop else view
        x = view.astype(np.float32).transpose(2, 0, 1) / 255.0
        mean = np.array(DINO_MEAN, np.float32)[:, None, None]
        planes += [(x - mean) / np.array(DINO_STD, np.float32)[:, None, None], (x - 0.5) / 0.5]
    np.testing.assert_allclose(got, np.concatenate(planes), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_quat_to_axis_angle_matches_scipy_rotation(seed):
    q = np.random.default_rng(seed).normal(size=4)
    q /= np.linalg.norm(q)  # (x, y, z, w), scipy's scalar-last convention too
    ours = quat_to_axis_angle(q)
    angle = np.linalg.norm(ours)
    np.testing.assert_allclose(angle, 2 * np.arccos(np.clip(q[3], -1, 1)), atol=1e-9)  # no canonicalisation
    np.testing.assert_allclose(Rotation.from_rotvec(ours).as_matrix(), Rotation.from_quat(q).as_matrix(), atol=1e-9)
    if q[3] >= 0:
        np.testing.assert_allclose(ours, Rotation.from_quat(q).as_rotvec(), atol=1e-9)


def test_quat_to_axis_angle_identity_is_zero():
    np.testing.assert_array_equal(quat_to_axis_angle(np.array([0.0, 0.0, 0.0, 1.0])), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(4,\) quaternion"):
        quat_to_axis_angle(np.zeros(3))


def test_extract_proprio_layout():
    q = np.array([0.1, -0.2, 0.3, 0.9])
    q /= np.linalg.norm(q)
    obs = {"robot0_eef_pos": np.array([1.0, 2.0, 3.0]), "robot0_eef_quat": q,
           "robot0_gripper_qpos": np.array([0.03, -0.02])}
    out = extract_proprio(obs)
    expected = np.concatenate([[1.0, 2.0, 3.0], Rotation.from_quat(q).as_rotvec(), [0.03, -0.02]])
    assert out.dtype == np.float32 and out.shape == (8,)
    np.testing.assert_allclose(out, expected, atol=1e-6)
    with pytest.raises(KeyError, match="robot0_gripper_qpos"):
        extract_proprio({k: v for k, v in obs.items() if k != "robot0_gripper_qpos"})


def test_policy_images_order_and_count():
    rng = np.random.default_rng(2)
    obs = {"agentview_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8),
           "robot0_eye_in_hand_image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)}
    two = policy_images(obs, 2, size=32)
    ref = [tf_policy_view(np.ascontiguousarray(obs[k][::-1, ::-1]), 32)
           for k in ("agentview_image", "robot0_eye_in_hand_image")]
    np.testing.assert_array_equal(two[0], ref[0])
    np.testing.assert_array_equal(two[1], ref[1])
    assert len(policy_images(obs, 1, size=32)) == 1
    with pytest.raises(ValueError, match="num_images_in_input must be 1"):
        policy_images(obs, 3)


UPSTREAM = json.loads((Path(__file__).parent / "upstream_eval_arithmetic.json").read_text())


def test_gripper_mapping_equals_upstream_golden():
    """Upstream's normalize_gripper_action + invert_gripper_action, run by tests/parity/
    generate_eval_arithmetic_golden.py on upstream's own code: equal to the bit, -0.0 at exactly 0.5 included."""
    got = gripper_to_env(np.array(UPSTREAM["inputs"]["gripper"]))
    np.testing.assert_array_equal(got, UPSTREAM["gripper_env"])
    assert np.signbit(got).tolist() == UPSTREAM["gripper_env_signbit"]
    assert got[UPSTREAM["inputs"]["gripper"].index(0.5)] == 0.0  # the tie commands neither way, as upstream
    assert SETTLE_ACTION.tolist() == [0, 0, 0, 0, 0, 0, -1]  # settle: no motion, gripper open


def test_eval_proprio_normalisation_equals_upstream_golden():
    """Upstream's normalize_proprio on edge cases: masked dims clipped to [-1, 1] (1.7 -> 1.0), bounds exceeded.
    The one deliberate difference: the constant dim (min == max) is 0 here, as in upstream's and this project's
    training, where upstream's evaluation formula gives +-1 (docs/LIBERO_EVAL.md)."""
    stats = UPSTREAM["inputs"]["proprio_stats"]
    constant = np.array(stats["min"]) == np.array(stats["max"])
    assert constant.tolist().count(True) == 1
    for state, want in zip(UPSTREAM["inputs"]["states"], UPSTREAM["normalize_proprio"], strict=True):
        got = normalize_proprio_for_eval(np.array(state), stats)
        np.testing.assert_allclose(got[~constant], np.array(want)[~constant], rtol=1e-6, atol=1e-7)
        assert got[constant].tolist() == [0.0] and abs(np.array(want)[constant][0]) == 1.0


def test_action_unnormalisation_equals_upstream_golden():
    got = unnormalize_bounds_q99(np.array(UPSTREAM["inputs"]["normalized_actions"]), UPSTREAM["inputs"]["action_stats"])
    np.testing.assert_allclose(got, UPSTREAM["unnormalize_actions"], rtol=1e-6, atol=1e-7)  # float32 output


def test_chunk_to_env_actions_keeps_arm_dims():
    chunk = np.random.default_rng(3).uniform(-1, 1, (8, 7))
    chunk[:, 6] = np.linspace(0, 1, 8)
    out = chunk_to_env_actions(chunk)
    np.testing.assert_array_equal(out[:, :6], chunk[:, :6])
    np.testing.assert_array_equal(out[:, 6], -np.sign(2.0 * chunk[:, 6] - 1.0))
    with pytest.raises(ValueError, match=r"shape \(K, 7\)"):
        chunk_to_env_actions(np.zeros((8, 6)))
    bad = chunk.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        chunk_to_env_actions(bad)


def test_policy_runner_unnormalises_with_known_bounds(tiny_policy_factory, tiny_stats, image_factory):
    """Full action path on the real tiny policy vs a hand computation from its normalised output."""
    tiny_policy = tiny_policy_factory(0)
    tiny_policy.processor.center_crop = True  # as recorded for a policy trained with crop augmentation
    images = [prepare_image(im) for im in image_factory(2, seed=5)]
    proprio = np.linspace(-0.2, 0.2, 8).astype(np.float32)
    runner = PolicyRunner(tiny_policy, unnorm_key="libero_spatial_no_noops", center_crop=True, use_proprio=True,
                          num_images=2)
    (env_chunk,) = runner([{"images": images, "instruction": "Pick up the bowl", "proprio": proprio}])

    # second code path: normalised actions straight from forward(), un-normalised by hand
    stats = tiny_stats["libero_spatial_no_noops"]
    inputs = tiny_policy.processor(images, "Pick up the bowl", center_crop=True)
    p = stats["proprio"]
    p_norm = np.clip(2 * (proprio - np.array(p["q01"])) / (np.array(p["q99"]) - np.array(p["q01"]) + 1e-8) - 1, -1, 1)
    inputs["proprio"] = torch.tensor(p_norm, dtype=torch.float32)[None]
    with torch.no_grad():
        norm = tiny_policy(inputs).actions[0].double().numpy()
    q01, q99 = np.array(stats["action"]["q01"]), np.array(stats["action"]["q99"])
    expected = norm.copy()
    expected[:, :6] = (norm[:, :6] + 1) / 2 * (q99[:6] - q01[:6] + 1e-8) + q01[:6]
    expected[:, 6] = np.where(norm[:, 6] >= 0.5, -1.0, 1.0)
    assert env_chunk.shape == (8, 7)
    np.testing.assert_allclose(env_chunk, expected, atol=1e-5)
    assert runner.calls == 1 and runner.received_instructions == ["Pick up the bowl"]


@pytest.mark.parametrize("use_proprio", [True, False])
def test_batched_rounds_equal_per_observation_predict_action(tiny_policy_factory, image_factory, use_proprio):
    """Several envs answered in one forward == one predict_action per env (prompts of different lengths)."""
    policy = tiny_policy_factory(0, use_proprio=use_proprio)
    policy.processor.center_crop = True  # as recorded for a policy trained with crop augmentation
    rng = np.random.default_rng(7)
    instructions = ["open the drawer", "put the bowl on the plate next to the cookie box", "turn on the stove"]
    requests = [{"images": [prepare_image(im) for im in image_factory(2, seed=10 + i)], "instruction": text,
                 "proprio": rng.uniform(-0.3, 0.3, 8).astype(np.float32)} for i, text in enumerate(instructions)]
    batched = PolicyRunner(policy, "libero_spatial_no_noops", center_crop=True, use_proprio=use_proprio,
                           num_images=2, batch=True)
    single = PolicyRunner(policy, "libero_spatial_no_noops", center_crop=True, use_proprio=use_proprio,
                          num_images=2, batch=False)
    out_b, out_s = batched(requests), single(requests)
    assert (batched.rounds, single.rounds, batched.calls) == (1, 1, 3)
    reference = [policy.predict_action(list(r["images"]), r["instruction"], r["proprio"] if use_proprio else None,
                                       "libero_spatial_no_noops", True) for r in requests]
    for b, s, ref in zip(out_b, out_s, reference, strict=True):
        np.testing.assert_allclose(b, s, atol=1e-5)
        np.testing.assert_allclose(b[:, :6], ref[:, :6], atol=1e-5)
    assert not np.allclose(out_s[0][:, :6], out_s[1][:, :6])  # different observations -> different actions


def test_videos_are_h264_mp4_that_decode_to_the_frames(tmp_path):
    """The written file is H.264 / yuv420p (browser-playable), read back by ffmpeg itself, and decodes to the
    frames that were written (up to lossy compression)."""
    import subprocess

    import imageio_ffmpeg

    from LIBERO.libero_env import write_video

    rng = np.random.default_rng(0)
    frames = [np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), 16, 0), 16, 1)
              for _ in range(12)]  # 128 px blocks of 16: compress well, so the decoded values stay close
    path = tmp_path / "episode.mp4"
    write_video(path, frames, fps=30)
    assert [p.name for p in tmp_path.iterdir()] == ["episode.mp4"]  # no partial file left

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    decoded = [np.frombuffer(f, np.uint8).reshape(128, 128, 3) for f in reader]
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p") and meta["size"] == (128, 128)
    assert len(decoded) == len(frames)
    errors = [np.abs(d.astype(int) - f.astype(int)).mean() for d, f in zip(decoded, frames, strict=True)]
    assert max(errors) < 8  # measured 2.1: lossy, but the same pictures (random frames would differ by ~85)
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
                           capture_output=True, text=True).stderr
    assert "Video: h264" in probe and "yuv420p" in probe
