"""Image path (decode, resize, augmentation) and the collated batch dict against independent computations."""

from __future__ import annotations

import colorsys
import hashlib

import numpy as np
import pytest
import torch
from tf_reference import tf_decode_resize

from prismatic.data.augmentation import AugmentationConfig, adjust_saturation_hue, augment_image
from prismatic.data.collator import VLACollator
from prismatic.data.image_ops import center_crop
from prismatic.data.loader import make_train_loader
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.data.synthetic_libero import synthetic_tasks
from prismatic.models.image_transform import images_to_pixel_values
from prismatic.models.prompting import build_prompt
from prismatic.training.train_step import to_device

NAME = "libero_10_no_noops"


def test_saturation_hue_equals_colorsys():
    rng = np.random.default_rng(0)
    pixels = rng.random((40, 3)).astype(np.float32)
    pixels[:4] = [[0.3, 0.3, 0.3], [1, 0, 0], [0, 1, 1], [0.2, 0.9, 0.2]]  # grey and pure hues
    for s_factor, delta in ((1.2, 0.05), (0.8, -0.05), (1.0, 0.0)):
        got = adjust_saturation_hue(np.ascontiguousarray(pixels.T[:, :, None]), s_factor, delta)[:, :, 0].T
        for p, g in zip(pixels, got, strict=True):
            h, s, v = colorsys.rgb_to_hsv(*map(float, p))
            expected = colorsys.hsv_to_rgb((h + delta) % 1.0, min(s * s_factor, 1.0), v)
            np.testing.assert_allclose(g, expected, atol=2e-6)


def test_augment_neutral_parameters_is_crop_resize():
    class FixedRng:
        def random(self, n):  # top/left 0.5 (centered), brightness 0, contrast/saturation 1, hue 0
            return np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5])

    image = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    got = augment_image(image, FixedRng(), AugmentationConfig())
    expected = center_crop(image)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1  # float round trip of the colour jitter only


def test_decode_and_resize_pipeline(libero_root, tokenizer):
    root, _ = libero_root
    ds = RLDSFrameDataset(root, NAME, tokenizer, num_images_in_input=2)
    sample = ds.get_frame(3)
    source = ds.sources[0]
    _, e, t = sample["sample_id"].split("/")
    step = int(source.table.episode_starts[int(e)]) + int(t)
    for cam_index, camera in enumerate(("image", "wrist_image")):
        data = source.reader.jpeg_bytes(camera, step)
        # upstream's RLDS frame: TensorFlow's decode_jpeg + lanczos3 antialias resize of the same stored bytes
        np.testing.assert_array_equal(sample["images"][cam_index], tf_decode_resize(data))


def test_collated_batch_dict(libero_root, tokenizer):
    root, episodes = libero_root
    ds = RLDSFrameDataset(root, NAME, tokenizer, num_images_in_input=2, use_proprio=True, image_aug=True, seed=2)
    batch = next(iter(make_train_loader(ds, per_rank_batch=5, num_steps=1)))
    assert set(batch) == {"images", "input_ids", "attention_mask", "actions", "proprio", "sample_ids",
                          "content_hashes", "dataset_names"}
    assert batch["images"].shape == (5, 2, 3, 224, 224) and batch["images"].dtype == torch.uint8
    pixel_values = to_device(batch, torch.device("cpu"))["pixel_values"]
    assert pixel_values.shape == (5, 12, 224, 224) and pixel_values.dtype == torch.float32
    assert batch["actions"].shape == (5, 8, 7) and batch["proprio"].shape == (5, 8)
    assert batch["attention_mask"].dtype == torch.bool and batch["input_ids"].dtype == torch.int64
    samples = [ds[p] for p in range(5)]
    for i, sample in enumerate(samples):
        ids = tokenizer(build_prompt(sample["instruction"]), add_special_tokens=False)["input_ids"]
        n = len(ids)
        assert batch["input_ids"][i, :n].tolist() == ids
        assert batch["attention_mask"][i].tolist() == [True] * n + [False] * (batch["input_ids"].shape[1] - n)
        assert (batch["input_ids"][i, n:] == tokenizer.pad_token_id).all()
        assert torch.equal(batch["images"][i], torch.from_numpy(sample["images"].transpose(0, 3, 1, 2)))
        torch.testing.assert_close(pixel_values[i], images_to_pixel_values(sample["images"]), rtol=0, atol=0)
        assert batch["sample_ids"][i] == sample["sample_id"] and batch["dataset_names"][i] == NAME
    assert batch["attention_mask"].sum(1).max() == batch["input_ids"].shape[1]  # right padding to the longest
    # content hash = sha1(raw JPEG bytes of the images used + instruction)
    src = ds.sources[0]
    _, e, t = samples[0]["sample_id"].split("/")
    step = int(src.table.episode_starts[int(e)]) + int(t)
    digest = hashlib.sha1(src.reader.jpeg_bytes("image", step) + src.reader.jpeg_bytes("wrist_image", step)
                          + samples[0]["instruction"].encode())
    assert batch["content_hashes"][0] == digest.hexdigest()
    with pytest.raises(ValueError, match="pad token"):
        VLACollator(None)


def test_synthetic_actions_follow_the_rule(libero_root):
    """Actions are a function of what the image shows (block position, colour) and of the instruction's goal."""
    _, episodes = libero_root
    goals = {text: (np.asarray(goal), gain) for text, goal, gain in synthetic_tasks(3)}
    for ep in episodes[NAME]:
        goal, gain = goals[ep["language_instruction"]]
        pos = ep["state"][:, :2].astype(np.float64)
        np.testing.assert_allclose(ep["action"][:, :2], np.clip(gain * (goal - pos), -1, 1), atol=1e-6)
        colour = np.round(ep["state"][:, 2] / 0.1)
        np.testing.assert_allclose(ep["action"][:, 2], 0.2 * (colour - 2), atol=1e-6)
        near = np.linalg.norm(goal - pos, axis=1) < 0.08
        np.testing.assert_array_equal(ep["action"][:, 6], np.where(near, 1.0, -1.0))
        # the block is drawn where the state says: its colour sits at the projected position
        r, c = (pos[0] * 255).astype(int)
        assert not np.array_equal(ep["image"][0, r, c], [128, 128, 128])
