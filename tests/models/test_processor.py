"""PrismaticProcessor: same tensors as composing the shared image/prompt functions by hand; save/reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tf_reference import tf_center_crop, tf_policy_view

from prismatic.models.image_transform import DINO_MEAN, DINO_STD
from prismatic.models.processing_vla import PrismaticProcessor
from prismatic.models.prompting import build_prompt


def _by_hand(image: np.ndarray, crop: bool) -> np.ndarray:
    """Upstream's view, computed by TensorFlow (JPEG round trip + lanczos3 to 224, + center crop), then DINO/SigLIP
    normalisation in numpy."""
    view = tf_policy_view(image)
    if crop:
        view = tf_center_crop(view)
    x = view.astype(np.float32).transpose(2, 0, 1) / 255.0
    dino = (x - np.array(DINO_MEAN, np.float32)[:, None, None]) / np.array(DINO_STD, np.float32)[:, None, None]
    return np.concatenate([dino, (x - 0.5) / 0.5])


@pytest.mark.parametrize("crop", [False, True])
def test_call_matches_hand_composition(tiny_tokenizer, image_factory, crop):
    proc = PrismaticProcessor(tiny_tokenizer, num_images=2)
    images = image_factory(2, seed=3)
    out = proc(images, "Pick up the black bowl.", center_crop=crop)
    assert out["pixel_values"].shape == (1, 12, 224, 224) and out["pixel_values"].dtype == torch.float32
    expected = np.concatenate([_by_hand(im, crop) for im in images])
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), expected, rtol=1e-5, atol=1e-5)
    ids = tiny_tokenizer(build_prompt("Pick up the black bowl."), add_special_tokens=False)["input_ids"]
    assert ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert out["input_ids"].tolist() == [ids] and out["attention_mask"].all()


def test_batch_tokenization_right_pads(tiny_tokenizer):
    proc = PrismaticProcessor(tiny_tokenizer)
    ids, mask = proc.tokenize_batch(["open the drawer", "put the bowl on the stove and open the drawer"])
    short = proc.tokenize("open the drawer")
    assert ids[0, :len(short)].tolist() == short and mask[0].sum() == len(short)
    assert (ids[0, len(short):] == tiny_tokenizer.pad_token_id).all() and mask[1].all()


def test_wrong_image_count(tiny_tokenizer, image_factory):
    with pytest.raises(ValueError, match=r"expected 2 image\(s\).*got 1"):
        PrismaticProcessor(tiny_tokenizer, num_images=2)(image_factory(1), "open the drawer")


def test_save_reload(tiny_tokenizer, image_factory, tmp_path):
    proc = PrismaticProcessor(tiny_tokenizer, num_images=2, center_crop=True)
    proc.save_pretrained(tmp_path)
    again = PrismaticProcessor.from_pretrained(tmp_path)
    assert again.to_dict() == proc.to_dict()
    images = image_factory(2)
    a, b = proc(images, "stack the blue cube"), again(images, "stack the blue cube")
    assert all(torch.equal(a[k], b[k]) for k in a)
