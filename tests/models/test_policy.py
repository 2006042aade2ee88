"""VLAPolicy: forward on the batch dict, predict_action (de)normalisation, checkpoint folder round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from prismatic.models.policy import VLAPolicy

KEY = "libero_spatial_no_noops"


def _proprio(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, 8)


def _batch(policy, images_list, instructions, proprios):
    ids, mask = policy.processor.tokenize_batch(instructions)
    pixels = torch.stack([policy.processor.preprocess_images(ims) for ims in images_list])
    return {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask,
            "proprio": torch.tensor(np.stack(proprios), dtype=torch.float32)}


def test_forward_batch_dict(tiny_policy, image_factory):
    batch = _batch(tiny_policy, [image_factory(2, 0), image_factory(2, 1)],
                   ["open the drawer", "put the bowl on the stove"], [np.zeros(8), np.ones(8) * 0.3])
    with torch.no_grad():
        out = tiny_policy(batch)
        single = tiny_policy({k: v[1:] for k, v in batch.items() if k != "input_ids" and k != "attention_mask"}
                             | {"input_ids": batch["input_ids"][1:, :batch["attention_mask"][1].sum()],
                                "attention_mask": batch["attention_mask"][1:, :batch["attention_mask"][1].sum()]})
    assert out.actions.shape == (2, 8, 7)
    torch.testing.assert_close(out.actions[1:], single.actions, rtol=1e-4, atol=1e-5)
    # proprio matters (it enters through the head)
    batch2 = dict(batch, proprio=batch["proprio"] + 0.5)
    with torch.no_grad():
        assert not torch.allclose(tiny_policy(batch2).actions, out.actions)


def test_predict_action_normalisation_by_hand(tiny_policy_factory, image_factory, tiny_stats):
    tiny_policy = tiny_policy_factory(0)
    tiny_policy.processor.center_crop = True  # as recorded for a run trained with crop augmentation
    images, proprio = image_factory(2, 7), _proprio(1)
    got = tiny_policy.predict_action(images, "Open the drawer.", proprio=proprio, unnorm_key=KEY)
    stats = tiny_stats[KEY]
    p01, p99 = np.array(stats["proprio"]["q01"]), np.array(stats["proprio"]["q99"])
    proprio_norm = np.clip(2 * (proprio - p01) / (p99 - p01 + 1e-8) - 1, -1, 1)
    inputs = tiny_policy.processor(images, "Open the drawer.")
    inputs["proprio"] = torch.tensor(proprio_norm, dtype=torch.float32)[None]
    with torch.no_grad():
        norm = tiny_policy(inputs).actions[0].double().numpy()
    a01, a99 = np.array(stats["action"]["q01"]), np.array(stats["action"]["q99"])
    expected = 0.5 * (norm + 1) * (a99 - a01 + 1e-8) + a01
    expected[:, 6] = norm[:, 6]  # gripper dim is masked out of normalisation
    assert got.shape == (8, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # unnorm_key=None picks the only dataset
    np.testing.assert_array_equal(got, tiny_policy.predict_action(images, "Open the drawer.", proprio, None, True))


def test_predict_action_bad_keys(tiny_policy, tiny_policy_factory, image_factory):
    images = image_factory(2)
    with pytest.raises(KeyError, match=r"unknown unnorm_key 'bridge'.*libero_spatial_no_noops"):
        tiny_policy.predict_action(images, "open the drawer", _proprio(), unnorm_key="bridge")
    policy = tiny_policy_factory(0)
    del policy.norm_stats[KEY]["proprio"]
    with pytest.raises(KeyError, match="no 'proprio' entry"):
        policy.predict_action(images, "open the drawer", _proprio(), unnorm_key=KEY)
    policy.norm_stats[KEY] = {"action": {"q99": [1.0] * 7}}
    with pytest.raises(KeyError, match="q01"):
        tiny_policy_factory(0, use_proprio=False).__class__  # noqa: B018 (keeps the factory used)
        no_proprio = tiny_policy_factory(0, use_proprio=False)
        no_proprio.norm_stats = policy.norm_stats
        no_proprio.predict_action(images, "open the drawer", None, unnorm_key=KEY)
    with pytest.raises(ValueError, match="pass the robot state"):
        tiny_policy.predict_action(images, "open the drawer", None, unnorm_key=KEY)
    with pytest.raises(ValueError, match="center_crop=True contradicts this checkpoint.*trained without crop"):
        tiny_policy.predict_action(images, "open the drawer", _proprio(), unnorm_key=KEY, center_crop=True)


@pytest.mark.parametrize("variant,use_proprio", [("pro", True), ("original", False)])
def test_save_reload_bit_identical(tiny_policy_factory, image_factory, tmp_path, variant, use_proprio):
    policy = tiny_policy_factory(2, head_variant=variant, use_proprio=use_proprio)
    policy.processor.center_crop = True  # recorded with the checkpoint, used by the reload
    folder = tmp_path / "run--150_chkpt"
    policy.save_pretrained(folder, step=150)
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "dataset_statistics.json", "policy_config.json",
            "action_head--150_checkpoint.pt", "prismatic_processor_config.json"} <= names
    assert ("proprio_projector--150_checkpoint.pt" in names) == use_proprio
    assert not any(n.startswith(".") for n in names) and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    head_state = torch.load(folder / "action_head--150_checkpoint.pt", weights_only=True)
    assert all(k.startswith("module.model.") for k in head_state)
    assert json.loads((folder / "policy_config.json").read_text())["head_variant"] == variant
    again = VLAPolicy.from_pretrained(folder)
    images, proprio = image_factory(2, 4), _proprio(2) if use_proprio else None
    assert again.processor.center_crop is True
    a = policy.predict_action(images, "turn on the stove", proprio, KEY)
    b = again.predict_action(images, "turn on the stove", proprio, KEY)
    np.testing.assert_array_equal(a, b)
    assert again.norm_stats == policy.norm_stats
    for key, value in policy.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key


def test_lora_policy_saves_merged_weights(tiny_policy_factory, image_factory, tmp_path):
    from prismatic.models.modeling_vla import apply_lora

    policy = tiny_policy_factory(3, use_proprio=False)
    policy.vla = apply_lora(policy.vla, rank=4)
    with torch.no_grad():
        for name, param in policy.vla.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    before = {k: v.clone() for k, v in policy.vla.state_dict().items()}
    images = image_factory(2, 11)
    expected = policy.predict_action(images, "stack the blue cube", None, KEY)
    policy.save_pretrained(tmp_path / "ckpt", step=1)
    assert all(torch.equal(before[k], v) for k, v in policy.vla.state_dict().items())  # live model untouched
    again = VLAPolicy.from_pretrained(tmp_path / "ckpt")
    base = policy.vla.get_base_model()
    layer = base.language_model.model.layers[0].self_attn.q_proj
    merged = layer.base_layer.weight + layer.lora_B["default"].weight @ layer.lora_A["default"].weight * \
        layer.scaling["default"]
    torch.testing.assert_close(again.vla.language_model.model.layers[0].self_attn.q_proj.weight, merged)
    np.testing.assert_allclose(again.predict_action(images, "stack the blue cube", None, KEY), expected,
                               rtol=1e-4, atol=1e-5)
