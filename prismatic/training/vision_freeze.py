"""Freeze baseline: the vision encoder (DINOv2 + SigLIP) is not trained; projector, LLM, queries and head are.

Under LoRA the vision encoder is frozen by giving it no adapters: filter the LoRA target list with
`lora_targets_without_vision` before wrapping (the base weights are frozen by peft anyway). `freeze_vision_backbone`
also sets requires_grad False on any LoRA tensors already inside the backbone, so either order leaves it frozen.
Call it before the optimizer's parameter list is built (and again after a resume rebuilds the policy).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from prismatic.models.modeling_vla import unwrap_vla

VISION_PREFIX = "vision_backbone."
WRAPPER_PREFIXES = ("module.", "base_model.model.")


def freeze_vision_backbone(vla: nn.Module) -> list[str]:
    """requires_grad False on every parameter of `vla.vision_backbone` (bare, peft- or DDP-wrapped VLA).

    Returns the names (relative to the vision backbone) that were frozen. Train/eval mode is left alone (the ViTs
    have no dropout; the mode is the training loop's business).
    """
    backbone = unwrap_vla(vla).vision_backbone
    names = [name for name, _ in backbone.named_parameters()]
    backbone.requires_grad_(False)
    return names


def is_vision_module_name(name: str) -> bool:
    """True for a module / parameter name inside the vision backbone (wrapper prefixes ignored)."""
    for prefix in WRAPPER_PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name.startswith(VISION_PREFIX) or name == VISION_PREFIX.rstrip(".")


def lora_targets_without_vision(target_modules: Iterable[str]) -> list[str]:
    """The LoRA target list (full module names, e.g. `lora_target_modules(vla)`) minus the vision backbone's modules.

    Raises on a pattern such as "all-linear" that cannot be filtered by name.
    """
    targets = list(target_modules) if not isinstance(target_modules, str) else [target_modules]
    if "all-linear" in targets:
        raise ValueError("cannot filter the LoRA target 'all-linear': pass the explicit module list "
                         "(prismatic.models.modeling_vla.lora_target_modules(vla))")
    return [t for t in targets if not is_vision_module_name(t)]
