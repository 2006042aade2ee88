"""Fused DINOv2 + SigLIP vision backbone built through timm (weights come from the checkpoint; a Prismatic base VLM
saved without its vision weights gets timm's pretrained ones, as upstream does, via `load_timm_pretrained`).

Each ViT returns the output of block `len(blocks) - 2` (second to last), patch tokens only (no cls/register tokens,
no final norm). Per image the two feature maps are concatenated on channels; with N images the patch sequences are
concatenated on the token axis: (B, 6N, H, W) -> (B, N * num_patches, dino_dim + siglip_dim).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

CHANNELS_PER_VIT = 3
CHANNELS_PER_IMAGE = 6  # [dino RGB, siglip RGB], see prismatic.models.image_transform


class ScaleFactorLayerScale(nn.Module):
    """timm's LayerScale with its parameter named `scale_factor` (the name stored in Prismatic/VLA checkpoints)."""

    def __init__(self, gamma: nn.Parameter) -> None:
        super().__init__()
        self.scale_factor = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale_factor


def rename_layer_scale(model: nn.Module) -> int:
    """Replace every timm LayerScale (param `gamma`) by `ScaleFactorLayerScale`; same values, same forward."""
    replaced = 0
    for name, module in list(model.named_modules()):
        gamma = getattr(module, "gamma", None)
        if type(module).__name__ == "LayerScale" and isinstance(gamma, nn.Parameter):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ScaleFactorLayerScale(gamma))
            replaced += 1
    return replaced


class PretrainedVisionWeightsUnavailable(RuntimeError):
    """timm could not provide the pretrained ViT weights (typically: no network and no local hub cache)."""


def build_vit(timm_id: str, image_size: int, act_layer: str | None, kwargs: dict[str, Any] | None,
              pretrained: bool = False) -> nn.Module:
    """One timm ViT without classifier, at `image_size`, LayerScale params renamed (random init unless pretrained)."""
    extra = dict(kwargs or {})
    if act_layer is not None:
        extra["act_layer"] = act_layer
    vit = timm.create_model(timm_id, pretrained=pretrained, num_classes=0, img_size=image_size, **extra)
    rename_layer_scale(vit)
    return vit


class FusedVisionBackbone(nn.Module):
    """`featurizer` (DINOv2) + `fused_featurizer` (SigLIP); see the module docstring for the output layout."""

    def __init__(
        self,
        timm_model_ids: Sequence[str],
        image_size: int = 224,
        timm_override_act_layers: Sequence[str | None] | None = None,
        timm_model_kwargs: Sequence[dict[str, Any] | None] | None = None,
    ) -> None:
        super().__init__()
        if len(timm_model_ids) != 2:
            raise ValueError(f"the fused backbone needs 2 timm ids [dino, siglip], got {list(timm_model_ids)}")
        acts = list(timm_override_act_layers or [None, None])
        kws = list(timm_model_kwargs or [None, None])
        self._timm_specs = list(zip(timm_model_ids, acts, kws, strict=True))
        self.image_size = int(image_size)
        self.featurizer = build_vit(timm_model_ids[0], self.image_size, acts[0], kws[0])
        self.fused_featurizer = build_vit(timm_model_ids[1], self.image_size, acts[1], kws[1])
        grids = {tuple(v.patch_embed.grid_size) for v in (self.featurizer, self.fused_featurizer)}
        if len(grids) != 1:
            raise ValueError(f"the two ViTs produce different patch grids {sorted(grids)}; cannot fuse them")
        grid = grids.pop()
        self.num_patches_per_image = int(grid[0] * grid[1])
        self.embed_dim = int(self.featurizer.embed_dim + self.fused_featurizer.embed_dim)

    def load_timm_pretrained(self) -> None:
        """Copy timm's pretrained weights into both ViTs (upstream's source of vision weights for a base VLM whose
        checkpoint omits them). Needs the hub or its local cache; raises PretrainedVisionWeightsUnavailable."""
        ids = [spec[0] for spec in self._timm_specs]
        for vit, (timm_id, act, kwargs) in zip((self.featurizer, self.fused_featurizer), self._timm_specs, strict=True):
            try:
                source = build_vit(timm_id, self.image_size, act, kwargs, pretrained=True)
            except Exception as exc:  # hub errors differ by version; all mean "weights not available here"
                raise PretrainedVisionWeightsUnavailable(
                    f"the vision weights come from timm's pretrained {ids} and could not be loaded "
                    f"({type(exc).__name__}); pre-download them where there is network: python -c \"import timm; "
                    f"[timm.create_model(i, pretrained=True) for i in {ids}]\", then copy the Hugging Face cache "
                    "(~/.cache/huggingface/hub, or $HF_HOME) to this machine") from exc
            vit.load_state_dict(source.state_dict(), strict=True)

    @staticmethod
    def _readout(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
        # Second-to-last block, patch tokens only, no final norm.
        return vit.get_intermediate_layers(images, n={len(vit.blocks) - 2})[0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 6N, H, W) -> (B, N * num_patches_per_image, embed_dim)."""
        if pixel_values.ndim != 4:
            raise ValueError(f"pixel_values must be (B, 6N, H, W), got shape {tuple(pixel_values.shape)}")
        batch, channels, height, width = pixel_values.shape
        if channels == 0 or channels % CHANNELS_PER_IMAGE != 0:
            raise ValueError(f"pixel_values must have {CHANNELS_PER_IMAGE} channels per image (3 DINO + 3 SigLIP), "
                             f"i.e. a multiple of {CHANNELS_PER_IMAGE}; got {channels} channels")
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(f"pixel_values must be {self.image_size}x{self.image_size}, got {height}x{width}")
        num_images = channels // CHANNELS_PER_IMAGE
        per_image = pixel_values.reshape(batch * num_images, CHANNELS_PER_IMAGE, height, width)
        dino, siglip = torch.split(per_image, [CHANNELS_PER_VIT, CHANNELS_PER_VIT], dim=1)
        fused = torch.cat([self._readout(self.featurizer, dino), self._readout(self.fused_featurizer, siglip)], dim=2)
        return fused.reshape(batch, num_images * fused.shape[1], fused.shape[2])
