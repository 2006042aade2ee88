"""Shared fixtures: a tiny tokenizer and small synthetic LIBERO-schema datasets written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from rlds_test_data import make_episodes

from prismatic.data.rlds_writer import write_rlds_dataset
from prismatic.models.tokenizer_tiny import train_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def libero_root(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """Root with `libero_10_no_noops` (TFDS name liber_o10, 2 shards) and `libero_goal_no_noops` (1 shard)."""
    root = tmp_path_factory.mktemp("rlds")
    episodes = {
        "libero_10_no_noops": make_episodes(3, 3, [12, 9, 15, 10], seed=1),
        "libero_goal_no_noops": make_episodes(2, 2, [10, 11], seed=2),
    }
    write_rlds_dataset(root, "libero_10_no_noops", episodes["libero_10_no_noops"], tfds_name="liber_o10",
                       num_shards=2)
    write_rlds_dataset(root, "libero_goal_no_noops", episodes["libero_goal_no_noops"], tfds_name="libero_goal")
    return root, episodes
