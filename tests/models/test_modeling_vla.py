"""OpenVLAForActionPrediction: latent groups per layer, hidden-state indexing, padding, save/reload, LoRA."""

from __future__ import annotations

import torch
from transformers import AutoModel

from prismatic.models.modeling_vla import OpenVLAForActionPrediction, apply_lora, lora_target_modules


def _batch(seed: int = 0, num_images: int = 1):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(2, 6 * num_images, 224, 224, generator=g)
    ids = torch.tensor([[0, 11, 12, 13, 14], [0, 21, 22, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return pixels, ids, mask


@torch.no_grad()
def test_latents_are_hidden_states_at_group_positions(tiny_vla):
    pixels, ids, mask = _batch()
    out = tiny_vla(pixels, ids, mask)
    L, P, Q = tiny_vla.config.num_llm_layers, 256, tiny_vla.config.num_action_queries
    assert len(out.hidden_states) == L + 1
    assert out.raw_latents.shape == (2, L + 1, P, 64) and out.action_query_latents.shape == (2, L + 1, Q, 64)
    lengths = [5, 3]
    for b in range(2):  # offset arithmetic (upstream's slices: one position left), independent of the masks
        start_q = 1 + P + lengths[b] - 1
        for layer in range(L + 1):
            h = out.hidden_states[layer][b]
            assert torch.equal(out.raw_latents[b, layer], h[0:P])
            assert torch.equal(out.action_query_latents[b, layer], h[start_q - 1: start_q - 1 + Q])
    # layer 0 = input embeddings: [last prompt token, queries 0..Q-2] and [prompt token 0, patches 0..P-2]
    embed = tiny_vla.get_input_embeddings()
    for b in range(2):
        last_token = embed(ids[b, lengths[b] - 1])
        torch.testing.assert_close(out.action_query_latents[b, 0, 0], last_token)
        torch.testing.assert_close(out.action_query_latents[b, 0, 1:], tiny_vla.action_queries.weight[:Q - 1])
        torch.testing.assert_close(out.raw_latents[b, 0, 0], embed(ids[b, 0]))
    torch.testing.assert_close(out.raw_latents[:, 0, 1:], tiny_vla.embed_patches(pixels)[:, :P - 1])


@torch.no_grad()
def test_hidden_state_indexing_last_is_after_final_norm(tiny_vla):
    pixels, ids, mask = _batch()
    captured = {}
    layers = tiny_vla.language_model.model.layers
    hooks = [layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, o[0] if isinstance(
        o, tuple) else o)) for i in range(len(layers))]
    try:
        out = tiny_vla(pixels, ids, mask)
    finally:
        for h in hooks:
            h.remove()
    L = len(layers)
    for layer in range(1, L):
        assert torch.equal(out.hidden_states[layer], captured[layer - 1])
    torch.testing.assert_close(out.hidden_states[L], tiny_vla.language_model.model.norm(captured[L - 1]))


@torch.no_grad()
def test_right_padding_does_not_change_a_sample(tiny_vla):
    pixels, ids, mask = _batch()
    batched = tiny_vla(pixels, ids, mask)
    alone = tiny_vla(pixels[1:], ids[1:, :3], mask[1:, :3])
    torch.testing.assert_close(batched.raw_latents[1:], alone.raw_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched.action_query_latents[1:], alone.action_query_latents, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_save_reload_bit_identical(tiny_vla, tmp_path):
    pixels, ids, mask = _batch()
    tiny_vla.save_pretrained(str(tmp_path))
    for loader in (OpenVLAForActionPrediction.from_pretrained, AutoModel.from_pretrained):
        again = loader(str(tmp_path)).eval()
        assert isinstance(again, OpenVLAForActionPrediction)
        assert again.language_model.lm_head.weight is again.language_model.model.embed_tokens.weight
        for key, value in tiny_vla.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key
    assert torch.equal(again(pixels, ids, mask).raw_latents, tiny_vla(pixels, ids, mask).raw_latents)


def test_lora_wraps_all_linear_but_lm_head(tiny_vla_factory):
    vla = tiny_vla_factory(3)
    pixels, ids, mask = _batch()
    with torch.no_grad():
        base = vla(pixels, ids, mask).action_query_latents
    targets = lora_target_modules(vla)
    expected = {n for n, m in vla.named_modules() if isinstance(m, torch.nn.Linear)} - {"language_model.lm_head"}
    assert set(targets) == expected
    peft_model = apply_lora(vla, rank=4)
    wrapped = {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert not any("lm_head" in n for n in wrapped) and len(wrapped) == len(expected)
    with torch.no_grad():  # make the adapters non-trivial, then check disable_adapter restores the base exactly
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        adapted = peft_model(pixel_values=pixels, input_ids=ids, attention_mask=mask).action_query_latents
        with peft_model.disable_adapter():
            restored = peft_model(pixel_values=pixels, input_ids=ids, attention_mask=mask).action_query_latents
    assert not torch.allclose(adapted, base)
    assert torch.equal(restored, base)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(n.endswith("action_queries.weight") for n in trainable)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)


def test_action_queries_start_at_zero(tiny_vla_factory):
    from prismatic.models.configuration_vla import make_vla_config

    torch.manual_seed(0)
    fresh = OpenVLAForActionPrediction(make_vla_config("tiny"))
    assert torch.count_nonzero(fresh.action_queries.weight) == 0
    assert fresh.action_queries.weight.shape == (64, 64)
