"""Fixtures of the baseline / drift tests: one intra-op thread, this folder importable, a tiny synthetic dataset."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # baseline_helpers

torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: more threads only slow them down


@pytest.fixture(scope="session")
def drift_data_root(tmp_path_factory) -> Path:
    """2 tasks x 2 episodes x 12 steps: 5 frames per episode, 20 frames."""
    from baseline_helpers import DATASET

    from prismatic.data.synthetic_libero import make_synthetic_libero_dataset

    root = tmp_path_factory.mktemp("rlds")
    make_synthetic_libero_dataset(root, DATASET, num_tasks=2, episodes_per_task=2, steps=12, seed=0)
    return root
