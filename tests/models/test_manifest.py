"""Real-size parameter names and shapes (built on the meta device) == the released checkpoints' manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prismatic.models.action_heads import L1RegressionActionHead
from prismatic.models.configuration_vla import make_vla_config
from prismatic.models.modeling_vla import OpenVLAForActionPrediction, lora_target_modules
from prismatic.models.proprio_projector import ProprioProjector

# vendored: names and shapes of the released checkpoints' tensors (VLA, both head variants, proprio projector)
MANIFEST = Path(__file__).resolve().parent / "vla_adapter_param_manifest.json"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def _shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def _diff(ours: dict, theirs: dict) -> str:
    return (f"missing {sorted(set(theirs) - set(ours))[:5]}, extra {sorted(set(ours) - set(theirs))[:5]}, "
            f"shape {[(k, ours[k], theirs[k]) for k in ours if k in theirs and ours[k] != theirs[k]][:5]}")


def test_real_vla_matches_manifest(manifest):
    with torch.device("meta"):
        vla = OpenVLAForActionPrediction(make_vla_config("real"))
    ours = _shapes(vla)
    assert ours == manifest["vla"], _diff(ours, manifest["vla"])
    assert vla.language_model.lm_head.weight is vla.language_model.model.embed_tokens.weight
    assert vla.vision_backbone.num_patches_per_image == 256 and vla.vision_backbone.embed_dim == 2176
    targets = lora_target_modules(vla)
    assert "language_model.lm_head" not in targets
    assert "language_model.model.layers.0.self_attn.q_proj" in targets and "projector.fc1" in targets


@pytest.mark.parametrize("variant,pro", [("action_head_pro", True), ("action_head_original", False)])
def test_real_heads_match_manifest(manifest, variant, pro):
    with torch.device("meta"):
        head = L1RegressionActionHead(896, 896, num_blocks=24, use_pro_version=pro)
    ours = _shapes(head)
    assert ours == manifest[variant], _diff(ours, manifest[variant])


def test_real_proprio_projector_matches_manifest(manifest):
    with torch.device("meta"):
        ours = _shapes(ProprioProjector(896))
    assert ours == manifest["proprio_projector"]
