"""Align baseline: L_align recomputed by hand, frozen P / teacher, gradient path, θ0 teacher, resume state, timm."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from baseline_helpers import tiny_batch

from prismatic.models.modeling_vla import apply_lora
from prismatic.training.align_loss import AlignRetention


def _perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _numpy_align_loss(hidden: np.ndarray, teacher: np.ndarray, proj_state: dict) -> float:
    """−mean cos(P(h), z) with P = LayerNorm, Linear, SiLU, Linear written out in float64 numpy."""
    w = {k: v.double().numpy() for k, v in proj_state.items()}
    mu = hidden.mean(-1, keepdims=True)
    var = ((hidden - mu) ** 2).mean(-1, keepdims=True)
    x = (hidden - mu) / np.sqrt(var + 1e-5) * w["0.weight"] + w["0.bias"]
    x = x @ w["1.weight"].T + w["1.bias"]
    x = x / (1.0 + np.exp(-x))
    x = x @ w["3.weight"].T + w["3.bias"]
    cos = (x * teacher).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(teacher, axis=-1))
    return float(-cos.mean())


@pytest.mark.parametrize("num_images", [1, 2])
def test_align_loss_matches_hand_computation_with_theta0_teacher(tiny_vla_factory, num_images):
    vla = tiny_vla_factory(0)
    theta0 = copy.deepcopy(vla)
    align = AlignRetention(vla, weight=0.2, seed=3)
    L = vla.config.num_llm_layers
    assert align.layer == L // 2 and align.weight == 0.2
    _perturb_(vla.vision_backbone, seed=1)  # the live backbone moves on; the teacher must stay θ0
    pixel_values, ids, mask = tiny_batch(2, num_images=num_images)
    out = vla(pixel_values, ids, mask)
    loss = align.loss(out, pixel_values)

    P = vla.num_patches_per_image * num_images
    # independent selection: the layout puts the P vision tokens at positions 1..P (after BOS) of every sample
    hidden = out.hidden_states[L // 2][:, 1:P + 1].detach().double().numpy()
    with torch.no_grad():
        z = theta0.vision_backbone(pixel_values).double().numpy()
    expected = _numpy_align_loss(hidden, z, align.projector.state_dict())
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    with torch.no_grad():
        live = vla.vision_backbone(pixel_values).double().numpy()
    assert abs(_numpy_align_loss(hidden, live, align.projector.state_dict()) - expected) > 1e-4

    total, l_align = align.total_loss(torch.tensor(0.5), out, pixel_values)
    assert total.item() == pytest.approx(0.5 + 0.2 * l_align.item(), rel=1e-6)


def test_projector_and_teacher_get_no_gradient_llm_below_layer_does(tiny_vla_factory):
    vla = tiny_vla_factory(0).train()
    align = AlignRetention(vla, seed=0)
    frozen_before = [p.detach().clone() for p in align.parameters()]
    pixel_values, ids, mask = tiny_batch(2, seed=1)
    align.loss(vla(pixel_values, ids, mask), pixel_values).backward()

    assert all(not p.requires_grad and p.grad is None for p in align.parameters())
    assert all(torch.equal(a, b) for a, b in zip(frozen_before, align.parameters(), strict=True))
    layers = vla.language_model.model.layers
    m = align.layer
    for i, layer in enumerate(layers):
        grads = [p.grad for p in layer.parameters()]
        if i < m:  # hidden_states[m] is the output of decoder layer m-1: layers 0..m-1 are on the path
            assert all(g is not None and g.abs().sum() > 0 for g in grads), f"decoder layer {i} got no gradient"
        else:
            assert all(g is None for g in grads), f"decoder layer {i} (after layer m={m}) got a gradient"
    # the loss exists to shape the visual path: projector and vision encoder receive gradient too
    assert vla.projector.fc1.weight.grad.abs().sum() > 0
    assert vla.vision_backbone.featurizer.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    queries = vla.action_queries.weight.grad  # queries sit after the vision tokens (causal attention): zero
    assert queries is None or queries.abs().max() == 0


def test_lora_teacher_is_the_base_backbone(tiny_vla_factory):
    vla = tiny_vla_factory(0)
    plain = copy.deepcopy(vla)
    peft_model = apply_lora(vla, rank=4)
    with torch.no_grad():  # make the adapters matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    align = AlignRetention(peft_model, seed=0)
    assert not any("lora" in n for n, _ in align.teacher.named_parameters())
    pixel_values, _, _ = tiny_batch(1, seed=2)
    with torch.no_grad():
        base = plain.vision_backbone(pixel_values)
        adapted = peft_model.get_base_model().vision_backbone(pixel_values)
    torch.testing.assert_close(align.teacher_features(pixel_values), base, rtol=0, atol=0)
    assert (adapted - base).abs().max() > 1e-3


def test_state_dict_roundtrip_and_refusals(tiny_vla_factory):
    vla = tiny_vla_factory(0)
    align = AlignRetention(vla, layer=1, seed=5)
    state = align.state_dict()
    assert "teacher_state" in state  # teacher="self": θ0 cannot be rebuilt from a fully fine-tuned model
    pixel_values, ids, mask = tiny_batch(2, seed=3)
    out = vla(pixel_values, ids, mask)
    expected = align.loss(out, pixel_values)

    moved = tiny_vla_factory(0)
    _perturb_(moved.vision_backbone, seed=9)  # a "resumed" model whose backbone was trained
    resumed = AlignRetention(moved, layer=1, seed=123)  # other seed: P must come from the state
    with pytest.raises(ValueError, match="fingerprint"):
        resumed.load_state_dict(align.state_dict(include_teacher=False))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.loss(out, pixel_values), expected)
    with pytest.raises(ValueError, match="layer"):
        AlignRetention(moved, layer=2, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        AlignRetention(vla, layer=vla.config.num_llm_layers + 1)


def test_timm_teacher_grid_is_interpolated_to_the_vla_grid(tiny_vla_factory):
    import torch.nn.functional as F

    vla = tiny_vla_factory(0)
    align = AlignRetention(vla, teacher="vit_tiny_patch16_224", timm_pretrained=False, seed=0,
                           timm_kwargs={"depth": 2})
    pixel_values, ids, mask = tiny_batch(2, seed=4)
    z = align.teacher_features(pixel_values)
    assert z.shape == (2, vla.num_patches_per_image, 192)

    # by hand: DINO channels back to [0, 1], SigLIP-style (0.5, 0.5) normalisation of vit_tiny, blocks, no final norm
    vit = align.teacher.model
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = ((pixel_values[:, :3] * std + mean) - 0.5) / 0.5
    with torch.no_grad():
        tokens = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))[:, vit.num_prefix_tokens:]
        grid = tokens.transpose(1, 2).reshape(2, 192, 14, 14)
        expected = F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-5)
    loss = align.loss(vla(pixel_values, ids, mask), pixel_values)
    assert torch.isfinite(loss) and -1.0 <= loss.item() <= 1.0
    two, _, _ = tiny_batch(2, seed=5, num_images=2)  # N images: token blocks per image, in image order
    z2 = align.teacher_features(two)
    assert z2.shape == (2, 2 * vla.num_patches_per_image, 192)
    torch.testing.assert_close(z2[:, vla.num_patches_per_image:], align.teacher_features(two[:, 6:]))


def test_timm_teacher_without_weights_fails_clearly(tiny_vla_factory, monkeypatch):
    import timm

    def offline(*_args, **_kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    vla = tiny_vla_factory(0)
    monkeypatch.setattr(timm, "create_model", offline)  # what the hub does offline (after its retries)
    with pytest.raises(RuntimeError, match=r"'vit_small_patch14_dinov2'.*--align_teacher self"):
        AlignRetention(vla, teacher="vit_small_patch14_dinov2")
