"""Shared model fixtures: the tiny tokenizer, tiny VLA configs/models and a tiny policy, all with fixed seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prismatic.models.configuration_vla import make_vla_config
from prismatic.models.modeling_vla import OpenVLAForActionPrediction
from prismatic.models.policy import PolicyConfig, VLAPolicy
from prismatic.models.processing_vla import PrismaticProcessor
from prismatic.models.tokenizer_tiny import train_tiny_tokenizer


def build_tiny_vla(seed: int = 0, **overrides) -> OpenVLAForActionPrediction:
    """Tiny VLA in eval mode; ActionQueries drawn at random (not zeros) so query positions are distinguishable."""
    torch.manual_seed(seed)
    model = OpenVLAForActionPrediction(make_vla_config("tiny", **overrides)).eval()
    with torch.no_grad():
        model.action_queries.weight.normal_(0.0, 0.5)
    return model


def tiny_norm_stats() -> dict:
    """Upstream-style dataset_statistics with non-trivial bounds (gripper action dim unmasked)."""
    rng = np.random.default_rng(0)
    a_q01 = -rng.uniform(0.5, 1.0, 7)
    a_q99 = rng.uniform(0.5, 1.0, 7)
    p_q01 = -rng.uniform(0.1, 0.4, 8)
    p_q99 = rng.uniform(0.1, 0.4, 8)
    return {"libero_spatial_no_noops": {
        "action": {"mean": [0.0] * 7, "std": [1.0] * 7, "q01": a_q01.tolist(), "q99": a_q99.tolist(),
                   "min": (a_q01 - 0.1).tolist(), "max": (a_q99 + 0.1).tolist(), "mask": [True] * 6 + [False]},
        "proprio": {"mean": [0.0] * 8, "std": [1.0] * 8, "q01": p_q01.tolist(), "q99": p_q99.tolist(),
                    "min": (p_q01 - 0.1).tolist(), "max": (p_q99 + 0.1).tolist()},
        "num_transitions": 100, "num_trajectories": 2}}


def build_tiny_policy(seed: int = 0, head_variant: str = "pro", use_proprio: bool = True,
                      num_images: int = 2) -> VLAPolicy:
    vla = build_tiny_vla(seed)
    processor = PrismaticProcessor(train_tiny_tokenizer(), num_images=num_images)
    torch.manual_seed(seed + 1)
    policy = VLAPolicy.from_vla(vla, processor, tiny_norm_stats(),
                                PolicyConfig(head_variant=head_variant, num_images_in_input=num_images,
                                             use_proprio=use_proprio))
    with torch.no_grad():  # open the raw-latent gates so every input group matters
        for block in policy.action_head.model.mlp_resnet_blocks:
            block.gating_factor.fill_(0.5)
    return policy.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_vla() -> OpenVLAForActionPrediction:
    """Read-only session model: tests that modify a model build their own with build_tiny_vla()."""
    return build_tiny_vla(0)


@pytest.fixture(scope="session")
def tiny_policy() -> VLAPolicy:
    """Read-only session policy (Pro head, proprio, 2 images)."""
    return build_tiny_policy(0)


def random_images(num: int, seed: int = 0, size: int = 256) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(num)]


@pytest.fixture(scope="session")
def tiny_vla_factory():
    """build_tiny_vla(seed=0, **config_overrides) -> a fresh tiny VLA the test may modify."""
    return build_tiny_vla


@pytest.fixture(scope="session")
def tiny_policy_factory():
    """build_tiny_policy(seed=0, head_variant="pro", use_proprio=True, num_images=2) -> a fresh tiny policy."""
    return build_tiny_policy


@pytest.fixture(scope="session")
def tiny_stats() -> dict:
    return tiny_norm_stats()


@pytest.fixture(scope="session")
def image_factory():
    """random_images(num, seed=0, size=256) -> list of uint8 (size, size, 3) images."""
    return random_images
