"""θ0's reference forward for online anchors (craft_step.reference_features) equals the full θ0 forward.

The fast path stops the decoder after the deepest hooked layer, flips peft's adapter flags instead of
`disable_adapter()`, and reuses the live vision tower's output when it is provably θ0's. The reference here is
independent: a deep copy of the VLA taken at θ0, run whole (every layer, own vision tower), pooled by hand.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from finetune import seed_everything
from prismatic.models.modeling_vla import unwrap_vla
from prismatic.training import policy_setup
from prismatic.training.craft_step import CRaFTStep
from prismatic.training.data_setup import build_training_data
from prismatic.training.distributed import init_distributed
from prismatic.training.finetune_config import validate_config
from prismatic.training.train_step import forward_losses


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(torch.float64).unsqueeze(-1)
    return (hidden.double() * m).sum(1) / m.sum(1)


def _count_calls(module: torch.nn.Module, counter: dict, key: str):
    return module.register_forward_hook(lambda *_: counter.__setitem__(key, counter.get(key, 0) + 1))


@pytest.mark.parametrize("use_lora,freeze_vision,raw_layer,aq_layer", [
    (True, False, None, None),   # default LoRA: adapters in the ViTs, θ0's vision tower runs
    (True, True, 1, 3),          # LoRA without vision adapters: vision reused, decoder stops after layer 3 of 4
    (False, False, 2, 2),        # full fine-tuning: vision trained, stops at layer 2
    (False, True, None, None),   # full fine-tuning, frozen vision: reused; the final norm is the deepest layer
])
def test_reference_features_equal_the_full_theta0_forward(make_cfg, use_lora, freeze_vision, raw_layer, aq_layer):
    cfg = make_cfg(use_craft=True, craft_anchor_source="online", use_lora=use_lora,
                   freeze_vision_backbone=freeze_vision, craft_raw_layer=raw_layer, craft_aq_layer=aq_layer)
    validate_config(cfg)
    env = init_distributed()
    seed_everything(cfg.seed)
    policy = policy_setup.build_policy(cfg, env)
    data = build_training_data(cfg, policy, env, run_dir=Path(cfg.run_root_dir) / "fast")
    theta0 = copy.deepcopy(unwrap_vla(policy.vla)).eval()  # LoRA B = 0 at build: the base model exactly
    craft = CRaFTStep(cfg, policy, env, data.train_set)
    assert craft.share_vision is freeze_vision
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # simulated training: θ != θ0 (LoRA, action queries, ... or everything trainable)
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    micro = next(data.train_stream(0))[0]
    b = micro.batch

    L = theta0.config.text_config.num_hidden_layers
    m, M = (L // 2 if raw_layer is None else raw_layer), (L if aq_layer is None else aq_layer)
    with torch.no_grad():
        full = theta0(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    # hidden_states[l] of the whole forward; the masks of what the head reads
    expected = torch.cat([_pool(full.hidden_states[m], full.layout.raw_latent_mask),
                          _pool(full.hidden_states[M], full.layout.action_query_latent_mask)], dim=-1)

    policy.train()
    with craft._live_vision_output() as vision:
        forward_losses(policy, micro, env.device)
    assert ("features" in vision) is freeze_vision
    calls: dict[str, int] = {}
    base = unwrap_vla(policy.vla)
    handles = [_count_calls(base.vision_backbone, calls, "vision"),
               _count_calls(base.language_model.model.layers[L - 1], calls, "last_layer"),
               _count_calls(base.language_model.model.norm, calls, "norm")]
    try:
        anchors = craft._anchors(micro, env.device, vision.get("features"))
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(anchors.double(), expected, rtol=1e-6, atol=1e-6)
    assert calls.get("vision", 0) == (0 if freeze_vision else 1)
    assert calls.get("last_layer", 0) == (1 if M == L else 0)  # stopped after layer M when M < L
    assert calls.get("norm", 0) == (1 if M == L else 0)
    # the live model is back: adapters on, train mode, trained tensors, trainable flags untouched
    assert policy.training and all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    with torch.no_grad(), craft.extractor.capture():
        out1 = policy.vla(pixel_values=b["pixel_values"], input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    live = craft.extractor.features(out1.layout)
    assert (live.double() - expected).abs().max() > 1e-3  # θ differs from θ0: the anchors are not the live features
