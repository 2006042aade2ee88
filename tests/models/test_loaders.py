"""Loading user-brought checkpoints written here with upstream names at tiny size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prismatic.models.configuration_vla import make_vla_config
from prismatic.models.loaders import (
    load_policy,
    load_prismatic_vlm_checkpoint,
    load_upstream_policy_folder,
    rename_prismatic_key,
)
from prismatic.models.policy import VLAPolicy

KEY = "libero_spatial_no_noops"


def _prismatic_native_state(vla) -> dict:
    """Inverse of the facts-sheet renames, written independently of the loader's rename table."""
    vision, projector, llm = {}, {}, {}
    for key, value in vla.state_dict().items():
        value = value.clone()
        if key.startswith("vision_backbone."):
            k = key[len("vision_backbone."):].replace(".scale_factor", ".gamma")
            k = k.replace("fused_featurizer.", "siglip_featurizer.", 1) if k.startswith("fused_featurizer.") \
                else k.replace("featurizer.", "dino_featurizer.", 1)
            vision[k] = value
        elif key.startswith("projector."):
            projector[key[len("projector."):].replace("fc1", "projector.0").replace("fc2", "projector.2")
                      .replace("fc3", "projector.4")] = value
        elif key.startswith("language_model."):
            llm["llm." + key[len("language_model."):]] = value
    return {"model": {"vision_backbone": vision, "projector": projector, "llm_backbone": llm}}


def _write_prismatic_run(tmp_path, vla, state=None):
    run = tmp_path / "prism-qwen25-tiny"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {
        "model_id": "prism-qwen25-extra-dinosiglip-224px-0_5b", "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "qwen25-0_5b-extra", "arch_specifier": "no-align+fused-gelu-mlp",
        "image_resize_strategy": "resize-naive", "llm_max_length": 2048}}))
    torch.save(state if state is not None else _prismatic_native_state(vla),
               run / "checkpoints" / "latest-checkpoint.pt")
    return run


def test_rename_table_examples():
    assert rename_prismatic_key("vision_backbone.dino_featurizer.blocks.0.ls1.gamma") == \
        "vision_backbone.featurizer.blocks.0.ls1.scale_factor"
    assert rename_prismatic_key("vision_backbone.siglip_featurizer.attn_pool.q.weight") == \
        "vision_backbone.fused_featurizer.attn_pool.q.weight"
    assert rename_prismatic_key("projector.projector.4.bias") == "projector.fc3.bias"
    assert rename_prismatic_key("llm_backbone.llm.model.norm.weight") == "language_model.model.norm.weight"


@torch.no_grad()
def test_prismatic_native_checkpoint_loads_identically(tmp_path, tiny_vla_factory):
    source = tiny_vla_factory(5)
    source.action_queries.weight.zero_()  # the loaded VLM gets fresh zero queries
    run = _write_prismatic_run(tmp_path, source)
    loaded = load_prismatic_vlm_checkpoint(run, vla_config=make_vla_config("tiny"))
    assert torch.count_nonzero(loaded.action_queries.weight) == 0
    assert loaded.language_model.lm_head.weight is loaded.language_model.model.embed_tokens.weight
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    pixels = torch.randn(1, 12, 224, 224)
    ids, mask = torch.tensor([[0, 30, 31]]), torch.ones(1, 3, dtype=torch.bool)
    a, b = source(pixels, ids, mask), loaded(pixels, ids, mask)
    assert torch.equal(a.raw_latents, b.raw_latents) and torch.equal(a.action_query_latents, b.action_query_latents)


def test_prismatic_checkpoint_errors(tmp_path, tiny_vla_factory):
    source = tiny_vla_factory(5)
    state = _prismatic_native_state(source)
    state["model"]["projector"]["projector.2.weight"] = torch.zeros(64, 10)
    run = _write_prismatic_run(tmp_path, source, state)
    with pytest.raises(ValueError, match=r"'projector\.fc2\.weight'.*\(64, 10\).*\(64, 512\)"):
        load_prismatic_vlm_checkpoint(run, vla_config=make_vla_config("tiny"))
    state = _prismatic_native_state(source)
    del state["model"]["llm_backbone"]["llm.model.norm.weight"]
    state["model"]["llm_backbone"]["llm.model.extra.weight"] = torch.zeros(1)
    (run / "checkpoints" / "latest-checkpoint.pt").unlink()
    torch.save(state, run / "checkpoints" / "latest-checkpoint.pt")
    with pytest.raises(ValueError, match=r"missing keys \['language_model\.model\.norm\.weight'\].*"
                                         r"unexpected keys \['language_model\.model\.extra\.weight'\]"):
        load_prismatic_vlm_checkpoint(run, vla_config=make_vla_config("tiny"))


def _write_upstream_folder(path, policy, step=5000):
    """Files as the released HF policy repos hold them: no policy_config.json, `module.` prefixes, no lm_head."""
    path.mkdir()
    config = policy.vla.config.to_dict()
    config.update({"architectures": ["OpenVLAForActionPrediction"], "torch_dtype": "float32",
                   "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig"}})
    (path / "config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in policy.vla.state_dict().items() if k != "language_model.lm_head.weight"}
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    policy.processor.tokenizer.save_pretrained(str(path))
    (path / "dataset_statistics.json").write_text(json.dumps(policy.norm_stats))
    torch.save({"module." + k: v for k, v in policy.action_head.state_dict().items()},
               path / f"action_head--{step}_checkpoint.pt")
    if policy.proprio_projector is not None:
        torch.save({"module." + k: v for k, v in policy.proprio_projector.state_dict().items()},
                   path / f"proprio_projector--{step}_checkpoint.pt")


@pytest.mark.parametrize("variant,use_proprio,loader", [("pro", True, load_upstream_policy_folder),
                                                        ("original", False, load_policy)])
def test_upstream_policy_folder(tmp_path, tiny_policy_factory, image_factory, variant, use_proprio, loader):
    source = tiny_policy_factory(7, head_variant=variant, use_proprio=use_proprio)
    folder = tmp_path / "LIBERO-Spatial-Pro"
    _write_upstream_folder(folder, source)
    for loaded in (loader(folder),):
        assert loaded.policy_config.head_variant == variant and loaded.policy_config.use_proprio == use_proprio
        assert loaded.processor.num_images == 2
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        images = image_factory(2, 9)
        proprio = np.linspace(-0.2, 0.2, 8) if use_proprio else None
        np.testing.assert_array_equal(loaded.predict_action(images, "open the drawer", proprio, KEY),
                                      source.predict_action(images, "open the drawer", proprio, KEY))


def test_load_policy_dispatch(tmp_path, tiny_policy_factory, tiny_tokenizer):
    source = tiny_policy_factory(8)
    ours = tmp_path / "run--10_chkpt"
    source.save_pretrained(ours, step=10)
    assert isinstance(load_policy(ours), VLAPolicy)
    # a Prismatic VLM folder needs the tokenizer from elsewhere and gets a fresh head; pass the tiny sizes
    run = _write_prismatic_run(tmp_path, source.vla)
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        load_policy(run, vla_config=make_vla_config("tiny"))
    policy = load_policy(run, tokenizer_path=ours, vla_config=make_vla_config("tiny"))
    assert policy.policy_config.head_variant == "pro" and policy.proprio_projector is not None
    assert torch.equal(policy.vla.projector.fc1.weight, source.vla.projector.fc1.weight)
    with pytest.raises(ValueError, match="neither"):
        load_policy(tmp_path)


def test_upstream_folder_with_bad_weights_fails_loudly(tmp_path, tiny_policy_factory):
    from safetensors.torch import load_file

    source = tiny_policy_factory(7)
    folder = tmp_path / "broken"
    _write_upstream_folder(folder, source)
    state = load_file(str(folder / "model.safetensors"))
    del state["projector.fc3.bias"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing keys \['projector\.fc3\.bias'\]"):
        load_upstream_policy_folder(folder)
    folder = tmp_path / "broken_head"
    _write_upstream_folder(folder, source)
    head_file = folder / "action_head--5000_checkpoint.pt"
    head_state = torch.load(head_file, weights_only=True)
    head_state["module.model.fc2.weight"] = torch.zeros(3, 64)
    torch.save(head_state, head_file)
    with pytest.raises(ValueError, match=r"model\.fc2\.weight: checkpoint \(3, 64\) vs model \(7, 64\)"):
        load_upstream_policy_folder(folder)


def test_base_vlm_without_vision_weights_takes_timm_pretrained(tmp_path, tiny_vla_factory, monkeypatch):
    """Upstream fills a base VLM's missing ViT weights from timm's pretrained models: a stand-in `timm.create_model`
    that returns seeded ViTs shows the weights land in the right place, the rest comes from the checkpoint."""
    import timm

    from prismatic.models import vision_backbone

    source = tiny_vla_factory(5)
    state = _prismatic_native_state(source)
    del state["model"]["vision_backbone"]
    run = _write_prismatic_run(tmp_path, source, state)
    real_create = timm.create_model
    made = {}

    def seeded_pretrained(name, pretrained=False, **kwargs):
        if pretrained:
            torch.manual_seed(len(made) + 100)
            made[name] = real_create(name, pretrained=False, **kwargs)
            return made[name]
        return real_create(name, pretrained=pretrained, **kwargs)

    monkeypatch.setattr(vision_backbone.timm, "create_model", seeded_pretrained)
    loaded = load_prismatic_vlm_checkpoint(run, vla_config=make_vla_config("tiny"))
    ids = make_vla_config("tiny").timm_model_ids
    assert sorted(made) == sorted(ids)
    for attr, timm_id in (("featurizer", ids[0]), ("fused_featurizer", ids[1])):
        ours = getattr(loaded.vision_backbone, attr).state_dict()
        theirs = {k.replace(".gamma", ".scale_factor"): v for k, v in made[timm_id].state_dict().items()}
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(loaded.projector.fc1.weight, source.projector.fc1.weight)
    assert torch.equal(loaded.language_model.model.norm.weight, source.language_model.model.norm.weight)


def test_base_vlm_without_vision_weights_offline_error(tmp_path, tiny_vla_factory, monkeypatch):
    """Offline, the real timm/hub path fails; the error names the timm ids and how to pre-download them."""
    from prismatic.models.vision_backbone import PretrainedVisionWeightsUnavailable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_home"))
    source = tiny_vla_factory(5)
    state = _prismatic_native_state(source)
    del state["model"]["vision_backbone"]
    run = _write_prismatic_run(tmp_path, source, state)
    with pytest.raises(PretrainedVisionWeightsUnavailable) as info:
        load_prismatic_vlm_checkpoint(run, vla_config=make_vla_config("tiny"))
    message = str(info.value)
    assert "\n" not in message
    for needle in (*make_vla_config("tiny").timm_model_ids, "pretrained=True", "huggingface/hub"):
        assert needle in message
