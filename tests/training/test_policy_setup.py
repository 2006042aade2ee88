"""Where fine-tuning starts from: a Prismatic native base VLM (--vlm_path) or a policy folder (--config_file_path)."""

from __future__ import annotations

import json

import torch

from finetune import train
from prismatic.models.configuration_vla import make_vla_config
from prismatic.models.modeling_vla import OpenVLAForActionPrediction
from prismatic.models.tokenizer_tiny import train_tiny_tokenizer
from prismatic.training import policy_setup
from prismatic.training.distributed import init_distributed


def _write_native_vlm(path, vla) -> None:
    """A Prismatic-native run folder: names of the facts sheet (dino/siglip featurizers, projector.N, llm, gamma)."""
    parts = {"vision_backbone": {}, "projector": {}, "llm_backbone": {}}
    for key, value in vla.state_dict().items():
        if key.startswith("vision_backbone."):
            k = key[len("vision_backbone."):].replace(".scale_factor", ".gamma")
            k = ("siglip_" + k[len("fused_"):]) if k.startswith("fused_featurizer.") else "dino_" + k
            parts["vision_backbone"][k] = value.clone()
        elif key.startswith("projector."):
            k = key[len("projector."):]
            parts["projector"]["projector." + {"fc1": "0", "fc2": "2", "fc3": "4"}[k[:3]] + k[3:]] = value.clone()
        elif key.startswith("language_model."):
            parts["llm_backbone"]["llm." + key[len("language_model."):]] = value.clone()
    (path / "checkpoints").mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model": {"vision_backbone_id": "dinosiglip-vit-so-224px",
                                                            "llm_backbone_id": "qwen25-0_5b-extra"}}))
    torch.save({"model": parts}, path / "checkpoints" / "latest-checkpoint.pt")


def test_start_from_native_vlm_with_fresh_lora(make_cfg, tmp_path):
    torch.manual_seed(123)
    source = OpenVLAForActionPrediction(make_vla_config("tiny"))
    _write_native_vlm(tmp_path / "prism-tiny", source)
    train_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    cfg = make_cfg(vlm_path=tmp_path / "prism-tiny", config_file_path=tmp_path / "tok", max_steps=1)
    policy = policy_setup.build_policy(cfg, init_distributed())
    base = dict(policy.vla.get_base_model().named_parameters())
    for name, want in source.named_parameters():
        if name == "action_queries.weight":
            assert torch.count_nonzero(base[name]) == 0  # new in the VLA: zeros
            continue
        got = base.get(name, base.get(name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")))
        assert got is not None and torch.equal(got, want), name
    # LoRA B starts at zero (gaussian init of A only): the adapted model equals the base at step 0
    assert all(torch.count_nonzero(p) == 0 for n, p in policy.named_parameters() if "lora_B" in n)
    assert train(cfg).final_step == 1


def test_continue_from_a_policy_folder(make_cfg, tmp_path):
    first = train(make_cfg(max_steps=1, use_lora=False, run_id="first"))
    cfg = make_cfg(config_file_path=first.last_checkpoint, max_steps=1, use_lora=True, run_id="second")
    policy = policy_setup.build_policy(cfg, init_distributed())
    trained = dict(first.policy.named_parameters())
    for name, p in policy.action_head.named_parameters():
        assert torch.equal(p, trained[f"action_head.{name}"]), name
    assert train(cfg).final_step == 1
