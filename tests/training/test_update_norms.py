"""UpdateNormMeter: per-group ||Δθ|| and AdamW √v̂ against a hand-written AdamW in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from prismatic.training.update_norms import ADAM_KEY, UPDATE_KEY, param_group


def test_param_groups_from_names():
    assert param_group("vla.base_model.model.language_model.model.layers.0.mlp.up_proj.lora_A.default.weight") \
        == "llm_lora"
    assert param_group("vla.base_model.model.vision_backbone.featurizer.blocks.0.attn.qkv.lora_B.default.weight") \
        == "vision_lora"
    assert param_group("vla.base_model.model.projector.fc1.lora_A.default.weight") == "projector"
    assert param_group("vla.base_model.model.action_queries.weight") == "action_queries"
    assert param_group("module.action_head.model.fc1.weight") == "action_head"
    assert param_group("proprio_projector.fc1.bias") == "proprio_projector"
    assert param_group("something_else") == "other"


def test_update_norms_and_adam_second_moments_match_a_hand_computation():
    from prismatic.training.update_norms import UpdateNormMeter

    torch.manual_seed(0)
    model = nn.ModuleDict({"action_head": nn.Linear(3, 2), "proprio_projector": nn.Linear(2, 2)})
    named = list(model.named_parameters())
    meter = UpdateNormMeter(named)
    opt = torch.optim.AdamW([p for _, p in named], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    ref = {n: p.detach().double().clone() for n, p in named}
    m = {n: torch.zeros_like(t) for n, t in ref.items()}
    v = {n: torch.zeros_like(t) for n, t in ref.items()}
    for t in range(1, 4):
        grads = {n: torch.randn(p.shape) * (10.0 if "action_head" in n else 0.1) for n, p in named}
        for n, p in named:
            p.grad = grads[n].clone()
        meter.before()
        opt.step()
        got = meter.after(opt)
        sq, vs, cnt = {}, {}, {}
        for n, _ in named:  # AdamW by hand (decoupled decay, bias-corrected moments)
            g = grads[n].double()
            group = param_group(n)
            new = ref[n] * (1 - 0.1 * 0.01)
            m[n] = 0.9 * m[n] + 0.1 * g
            v[n] = 0.99 * v[n] + 0.01 * g * g
            v_hat = v[n] / (1 - 0.99**t)
            new = new - 0.1 * (m[n] / (1 - 0.9**t)) / (v_hat.sqrt() + 1e-8)
            sq[group] = sq.get(group, 0.0) + float((new - ref[n]).pow(2).sum())
            vs[group] = vs.get(group, 0.0) + float(v_hat.sqrt().sum())
            cnt[group] = cnt.get(group, 0) + ref[n].numel()
            ref[n] = new
        for group in ("action_head", "proprio_projector"):
            assert got[UPDATE_KEY.format(group)] == pytest.approx(math.sqrt(sq[group]), rel=1e-5)
            assert got[ADAM_KEY.format(group)] == pytest.approx(vs[group] / cnt[group], rel=1e-5)
    assert got[ADAM_KEY.format("action_head")] > 10 * got[ADAM_KEY.format("proprio_projector")]
    with pytest.raises(RuntimeError, match="before"):
        meter.after(opt)
