"""CRaFTWeightManager (θ0 swap: LoRA and full fine-tuning) and the feature extractor on the tiny VLA preset."""

from __future__ import annotations

import copy

import pytest
import torch

from prismatic.models.configuration_vla import make_vla_config
from prismatic.models.modeling_vla import OpenVLAForActionPrediction, apply_lora
from prismatic.training.craft_utils import CRaFTFeatureExtractor, CRaFTWeightManager, retention_loss


def _tiny_vla(seed: int = 0) -> OpenVLAForActionPrediction:
    torch.manual_seed(seed)
    return OpenVLAForActionPrediction(make_vla_config("tiny")).eval()


def _batch(seed: int = 0, b: int = 1):
    g = torch.Generator().manual_seed(seed)
    cfg = make_vla_config("tiny")
    ids = torch.randint(5, 40, (b, 7), generator=g)
    ids[:, 0] = cfg.text_config.bos_token_id
    mask = torch.ones(b, 7, dtype=torch.bool)
    mask[-1, 5:] = False  # right padding on the last sample
    return torch.randn(b, 6, 224, 224, generator=g), ids, mask


def _features(model, ext, batch):
    with torch.no_grad(), ext.capture():
        out = model(*batch)
    return ext.features(out.layout)


def _perturb_(params, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_extractor_on_tiny_vla_matches_model_latents():
    vla = _tiny_vla()
    with torch.no_grad():
        vla.action_queries.weight.normal_(0, 0.5)
    ext = CRaFTFeatureExtractor(vla)
    L = vla.config.text_config.num_hidden_layers
    assert (ext.raw_layer, ext.aq_layer) == (L // 2, L)
    batch = _batch(b=2)
    with torch.no_grad(), ext.capture():
        out = vla(*batch)
    feats = ext.features(out.layout)
    # second code path: the VLA's own gathered latents (all vision / query tokens, fixed counts)
    ref = torch.cat([out.raw_latents[:, L // 2].mean(1), out.action_query_latents[:, L].mean(1)], dim=-1)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", ["copy", "cpu_swap"])
def test_full_finetune_reference_weights_exact(storage):
    vla = _tiny_vla()
    theta0 = copy.deepcopy(vla)
    ext, ext0 = CRaFTFeatureExtractor(vla), CRaFTFeatureExtractor(theta0)
    batch = _batch(1)
    mgr = CRaFTWeightManager(vla, storage=storage)
    _perturb_(vla.parameters(), seed=3)  # "training"
    trained = {n: p.detach().clone() for n, p in vla.named_parameters()}
    ids_before = {n: p.data.data_ptr() for n, p in vla.named_parameters()}
    f_trained = _features(vla, ext, batch)
    f0 = _features(theta0, ext0, batch)
    assert not torch.equal(f_trained, f0)
    vla.train()
    with mgr.reference_weights():
        assert not vla.training
        f_ref = _features(vla, ext, batch)
    torch.testing.assert_close(f_ref, f0, rtol=0, atol=0)  # exactly the θ0 model
    assert vla.training  # mode restored
    for n, p in vla.named_parameters():
        assert torch.equal(p, trained[n]), n  # trained weights restored exactly
        assert p.data.data_ptr() == ids_before[n], n
    vla.eval()
    torch.testing.assert_close(_features(vla, ext, batch), f_trained, rtol=0, atol=0)


def test_lora_reference_weights_disable_adapter_and_swap_queries():
    vla = _tiny_vla()
    with torch.no_grad():
        vla.action_queries.weight.normal_(0, 0.5)
    theta0 = copy.deepcopy(vla)
    peft_model = apply_lora(vla, rank=4)
    mgr = CRaFTWeightManager(peft_model)
    assert mgr.is_lora and mgr.swapped_names == ["action_queries.weight"]
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    _perturb_(trainable, seed=5)  # LoRA B matrices and the queries move
    ext, ext0 = CRaFTFeatureExtractor(peft_model), CRaFTFeatureExtractor(theta0)
    batch = _batch(2)
    f_trained = _features(peft_model, ext, batch)
    f0 = _features(theta0, ext0, batch)
    assert not torch.allclose(f_trained, f0)
    with mgr.reference_weights():
        f_ref = _features(peft_model, ext, batch)
    torch.testing.assert_close(f_ref, f0, rtol=0, atol=0)
    torch.testing.assert_close(_features(peft_model, ext, batch), f_trained, rtol=0, atol=0)
    assert retention_loss(f_trained, f_ref) > 0


def test_snapshot_state_from_other_checkpoint():
    vla, other = _tiny_vla(0), _tiny_vla(1)
    ext, ext_o = CRaFTFeatureExtractor(vla), CRaFTFeatureExtractor(other)
    batch = _batch(4)
    mgr = CRaFTWeightManager(vla, snapshot_state=other.state_dict())
    with mgr.reference_weights():
        f_ref = _features(vla, ext, batch)
    torch.testing.assert_close(f_ref, _features(other, ext_o, batch), rtol=0, atol=0)
    bad = dict(other.state_dict())
    bad["action_queries.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="action_queries.weight"):
        CRaFTWeightManager(vla, snapshot_state=bad)
    del bad["action_queries.weight"]
    with pytest.raises(KeyError, match="lacks"):
        CRaFTWeightManager(vla, snapshot_state=bad)


def test_lora_craft_step_on_tiny_vla_covers_every_reached_param():
    """One CRaFT micro-batch on the LoRA tiny VLA: extractor + online θ0 anchors + projector."""
    from prismatic.training.craft_utils import CRaFTGradientProjector

    vla = _tiny_vla()
    peft_model = apply_lora(vla, rank=2)
    head = torch.nn.Linear(vla.config.hidden_size, 7)  # stands in for the action head (only L_act reaches it)
    named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad] + list(head.named_parameters())
    params = [p for _, p in named]
    _perturb_([p for n, p in named if "lora_B" in n or "action_queries" in n], seed=9)
    mgr, ext = CRaFTWeightManager(peft_model), CRaFTFeatureExtractor(peft_model, anchor_type="concat")
    batch = _batch(6, b=1)
    with torch.no_grad(), mgr.reference_weights(), ext.capture():
        ref_out = peft_model(*batch)
    anchors = ext.features(ref_out.layout)
    with ext.capture():
        out = peft_model(*batch)
    feats = ext.features(out.layout)
    loss_act = head(out.action_query_latents[:, -1].mean(1)).abs().mean()
    loss_ret = retention_loss(feats, anchors)
    assert loss_ret > 0
    reach_act = [g is not None for g in torch.autograd.grad(loss_act, params, retain_graph=True, allow_unused=True)]
    reach_ret = [g is not None for g in torch.autograd.grad(loss_ret, params, retain_graph=True, allow_unused=True)]
    proj = CRaFTGradientProjector(named)
    proj.accumulate(loss_act, loss_ret)
    stats = proj.step(lam=0.5)
    for (n, p), ra, rr in zip(named, reach_act, reach_ret, strict=True):
        assert (p.grad is not None) == (ra or rr), n
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    assert any(ra and not rr for ra, rr in zip(reach_act, reach_ret, strict=True))  # the head: L_act only
    assert not all(ra or rr for ra, rr in zip(reach_act, reach_ret, strict=True))  # last ViT block: unused
    assert stats["num_shared_tensors"] > 0
