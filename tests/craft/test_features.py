"""CRaFTFeatureExtractor (hooks vs output_hidden_states, pooling vs numpy, wrappers) and retention_loss."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from prismatic.training.craft_utils import CRaFTFeatureExtractor, masked_mean, retention_loss

L, D, T, B = 4, 32, 12, 3


class LMHolder(nn.Module):
    """A VLA-shaped holder: `language_model` is a Qwen2ForCausalLM (what the real VLA stores)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        cfg = Qwen2Config(hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)
        self.language_model = Qwen2ForCausalLM(cfg).eval()

    def forward(self, input_ids: torch.Tensor):
        return self.language_model(input_ids=input_ids, output_hidden_states=True)


def _layout(seed: int = 0):
    rng = np.random.default_rng(seed)
    vision = np.zeros((B, T), bool)
    query = np.zeros((B, T), bool)
    for b in range(B):  # different group sizes/positions per sample, as with padding
        vision[b, 1 : 1 + rng.integers(2, 5)] = True
        query[b, 7 : 7 + rng.integers(1, 4)] = True
    return SimpleNamespace(raw_latent_mask=torch.from_numpy(vision), action_query_latent_mask=torch.from_numpy(query))


def _numpy_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.stack([h[b][mask[b]].mean(axis=0) for b in range(h.shape[0])])


@pytest.mark.parametrize("raw_layer,aq_layer", [(0, L), (2, 3), (1, 1), (None, None)])
@pytest.mark.parametrize("anchor_type", ["concat", "raw_only", "aq_only"])
def test_hooks_match_output_hidden_states(raw_layer, aq_layer, anchor_type):
    model = LMHolder()
    ext = CRaFTFeatureExtractor(model, raw_layer=raw_layer, aq_layer=aq_layer, anchor_type=anchor_type)
    m, M = (L // 2 if raw_layer is None else raw_layer), (L if aq_layer is None else aq_layer)
    assert (ext.raw_layer, ext.aq_layer) == (m, M)
    layout = _layout()
    ids = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1))
    with ext.capture():
        out = model(ids)
    feats = ext.features(layout)
    hs = [h.detach().double().numpy() for h in out.hidden_states]
    parts = []
    if anchor_type != "aq_only":
        parts.append(_numpy_pool(hs[m], layout.raw_latent_mask.numpy()))
    if anchor_type != "raw_only":
        parts.append(_numpy_pool(hs[M], layout.action_query_latent_mask.numpy()))
    np.testing.assert_allclose(feats.detach().double().numpy(), np.concatenate(parts, axis=1), rtol=1e-5, atol=1e-6)
    assert feats.shape == (B, ext.feature_dim(D))
    assert feats.requires_grad  # the trained-model features carry the graph for L_ret


def test_layer_zero_hook_is_the_embedding_sequence():
    model = LMHolder()
    ext = CRaFTFeatureExtractor(model, raw_layer=0, aq_layer=0)
    ids = torch.randint(0, 50, (B, T))
    with ext.capture():
        model(ids)
    layout = _layout(3)
    emb = model.language_model.model.embed_tokens(ids).detach().numpy()
    got = ext.features(layout).detach().numpy()[:, :D]
    np.testing.assert_allclose(got, _numpy_pool(emb, layout.raw_latent_mask.numpy()), rtol=1e-6, atol=1e-6)


def test_hooks_removed_after_capture_and_features_consumed():
    model = LMHolder()
    ext = CRaFTFeatureExtractor(model)
    with ext.capture():
        model(torch.randint(0, 50, (B, T)))
    assert not model.language_model.model.norm._forward_hooks
    ext.features(_layout())
    with pytest.raises(RuntimeError, match="no hidden states captured"):
        ext.features(_layout())  # stale captures are never reused
    model(torch.randint(0, 50, (B, T)))  # outside capture: nothing is stored
    with pytest.raises(RuntimeError, match="no hidden states captured"):
        ext.features(_layout())


def test_through_peft_and_ddp_wrappers(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = LMHolder()
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    ext = CRaFTFeatureExtractor(peft_model, raw_layer=1, aq_layer=L)
    assert ext.core is model.language_model.model
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(LMHolder())
        ext2 = CRaFTFeatureExtractor(ddp)
        assert ext2.core is ddp.module.language_model.model
    finally:
        dist.destroy_process_group()


def test_masked_mean_vs_numpy_and_errors():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((B, T, 5)).astype(np.float32)
    layout = _layout(5)
    got = masked_mean(torch.from_numpy(h), layout.raw_latent_mask, "vision")
    np.testing.assert_allclose(got.numpy(), _numpy_pool(h, layout.raw_latent_mask.numpy()), rtol=1e-6, atol=1e-6)
    empty = layout.raw_latent_mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"empty token group for samples \[1\]"):
        masked_mean(torch.from_numpy(h), empty, "vision")
    with pytest.raises(ValueError, match="do not match"):
        masked_mean(torch.from_numpy(h), layout.raw_latent_mask[:, :-1], "vision")


def test_bad_layers_and_nan():
    model = LMHolder()
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.4"):
        CRaFTFeatureExtractor(model, raw_layer=5)
    with pytest.raises(ValueError, match=r"aq_layer.*out of range"):
        CRaFTFeatureExtractor(model, aq_layer=-1)
    with pytest.raises(ValueError, match="anchor_type"):
        CRaFTFeatureExtractor(model, anchor_type="both")
    ext = CRaFTFeatureExtractor(model, raw_layer=1, aq_layer=2)
    with torch.no_grad():
        model.language_model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with ext.capture():
        model(torch.randint(0, 50, (B, T)))
    with pytest.raises(FloatingPointError, match="non-finite"):
        ext.features(_layout())


def test_retention_loss_units():
    rng = np.random.default_rng(1)
    f, a = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    got = retention_loss(torch.tensor(f, dtype=torch.float32), torch.tensor(a, dtype=torch.float32))
    assert float(got) == pytest.approx(((f - a) ** 2).sum(axis=1).mean(), rel=1e-6)  # sum over dims, mean over batch
    with pytest.raises(ValueError, match=r"\(4, 6\).*\(4, 5\)"):
        retention_loss(torch.zeros(4, 6), torch.zeros(4, 5))
    with pytest.raises(FloatingPointError, match="anchors"):
        retention_loss(torch.zeros(1, 2), torch.tensor([[float("nan"), 0.0]]))
