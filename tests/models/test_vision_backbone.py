"""Fused ViT backbone: second-to-last block patch tokens, multi-image layout, LayerScale renaming."""

from __future__ import annotations

import pytest
import timm
import torch

from prismatic.models.configuration_vla import DINO_TIMM_ID, SIGLIP_TIMM_ID, TINY_VIT_KWARGS
from prismatic.models.vision_backbone import FusedVisionBackbone


@pytest.fixture(scope="module")
def backbone() -> FusedVisionBackbone:
    torch.manual_seed(0)
    return FusedVisionBackbone([DINO_TIMM_ID, SIGLIP_TIMM_ID], 224, None, [TINY_VIT_KWARGS, TINY_VIT_KWARGS]).eval()


def _manual_readout(vit, images: torch.Tensor) -> torch.Tensor:
    """Independent path: embed, run blocks 0..len-2 one by one, drop prefix tokens (no final norm)."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    for block in vit.blocks[: len(vit.blocks) - 1]:
        x = block(x)
    return x[:, vit.num_prefix_tokens:]


@torch.no_grad()
def test_two_images_concatenated_on_tokens(backbone):
    torch.manual_seed(1)
    pixels = torch.randn(2, 12, 224, 224)
    out = backbone(pixels)
    assert out.shape == (2, 512, 128)
    for image in range(2):
        dino = _manual_readout(backbone.featurizer, pixels[:, 6 * image: 6 * image + 3])
        siglip = _manual_readout(backbone.fused_featurizer, pixels[:, 6 * image + 3: 6 * image + 6])
        expected = torch.cat([dino, siglip], dim=2)
        torch.testing.assert_close(out[:, 256 * image: 256 * (image + 1)], expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_one_image(backbone):
    pixels = torch.randn(1, 6, 224, 224)
    assert backbone(pixels).shape == (1, 256, 128)


def test_wrong_channel_count(backbone):
    with pytest.raises(ValueError, match=r"6 channels per image.*got 9 channels"):
        backbone(torch.zeros(1, 9, 224, 224))
    with pytest.raises(ValueError, match="224x224"):
        backbone(torch.zeros(1, 6, 112, 112))


@torch.no_grad()
def test_layer_scale_renamed_forward_unchanged(backbone):
    names = list(backbone.state_dict())
    assert "featurizer.blocks.0.ls1.scale_factor" in names
    assert not any(n.endswith(".gamma") for n in names)
    # A stock timm DINOv2 holding the same weights (scale_factor -> gamma) gives the same features.
    stock = timm.create_model(DINO_TIMM_ID, pretrained=False, num_classes=0, img_size=224, **TINY_VIT_KWARGS).eval()
    with torch.no_grad():
        for block in backbone.featurizer.blocks:
            block.ls1.scale_factor.uniform_(0.5, 1.5)
    state = {k.replace(".scale_factor", ".gamma"): v for k, v in backbone.featurizer.state_dict().items()}
    stock.load_state_dict(state, strict=True)
    images = torch.randn(1, 3, 224, 224)
    n = len(stock.blocks) - 2
    torch.testing.assert_close(backbone.featurizer.get_intermediate_layers(images, n={n})[0],
                               stock.get_intermediate_layers(images, n={n})[0])
