"""Freeze baseline: vision weights do not move under training, everything else that gets a gradient does."""

from __future__ import annotations

import torch
from baseline_helpers import tiny_batch

from prismatic.models.modeling_vla import apply_lora, lora_target_modules
from prismatic.training.train_step import action_l1_losses
from prismatic.training.vision_freeze import freeze_vision_backbone, lora_targets_without_vision


def test_frozen_vision_is_unchanged_after_optimizer_steps(tiny_policy_factory):
    policy = tiny_policy_factory(0, num_images=1).train()
    policy.requires_grad_(True)
    frozen = freeze_vision_backbone(policy.vla)
    vision_names = {f"vla.vision_backbone.{n}" for n in frozen}
    assert vision_names == {n for n, _ in policy.named_parameters() if n.startswith("vla.vision_backbone.")}
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    params = [p for p in policy.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in policy.vla.vision_backbone.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    pixel_values, ids, mask = tiny_batch(2, seed=5)
    batch = {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": mask,
             "proprio": torch.randn(2, 8), "actions": torch.rand(2, 8, 7) * 2 - 1}
    for _ in range(3):
        loss, _, _ = action_l1_losses(policy(batch).actions, batch["actions"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in policy.named_parameters():
        if name in vision_names:
            assert torch.equal(p, before[name]), f"frozen {name} changed"
    changed = {n for n, p in policy.named_parameters() if n not in vision_names and not torch.equal(p, before[n])}
    for must in ("vla.projector.fc1.weight", "vla.language_model.model.layers.0.mlp.up_proj.weight",
                 "vla.action_queries.weight", "action_head.model.fc2.weight"):
        assert must in changed, f"{must} did not change"


def test_lora_targets_filter_and_freeze_under_lora(tiny_vla_factory):
    vla = tiny_vla_factory(0)
    targets = lora_target_modules(vla)
    kept = lora_targets_without_vision(targets)
    assert kept == [t for t in targets if not t.startswith("vision_backbone.")]
    assert any(t.startswith("vision_backbone.") for t in targets) and any(t.startswith("language_model.") for t in kept)
    assert lora_targets_without_vision(["base_model.model.vision_backbone.x.fc1", "projector.fc1"]) == ["projector.fc1"]
    peft_model = apply_lora(vla, rank=4)  # upstream all-linear: adapters inside the vision backbone too
    freeze_vision_backbone(peft_model)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and not any(".vision_backbone." in n for n in trainable)
    assert any("lora_A" in n and "language_model" in n for n in trainable)
