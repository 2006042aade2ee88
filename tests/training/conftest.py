"""Shared fixtures of the training tests: repo on sys.path, one intra-op thread, a tiny synthetic LIBERO dataset."""

import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# The tiny model's ops are small: with several OMP threads on a shared 2-core machine a step is 10x slower.
torch.set_num_threads(1)

DATASET = "synthetic_libero_no_noops"


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """2 tasks x 2 episodes x 12 steps: 5 frames per episode (the last 7 steps carry no full chunk), 20 frames."""
    from prismatic.data.synthetic_libero import make_synthetic_libero_dataset

    root = tmp_path_factory.mktemp("rlds")
    make_synthetic_libero_dataset(root, DATASET, num_tasks=2, episodes_per_task=2, steps=12, seed=0)
    return root


@pytest.fixture()
def make_cfg(tiny_data_root, tmp_path):
    """FinetuneConfig for the tiny preset on the synthetic data, 1 camera, no augmentation, wandb disabled."""
    from prismatic.training.finetune_config import FinetuneConfig

    def make(**overrides):
        values = dict(data_root_dir=tiny_data_root, dataset_name=DATASET, run_root_dir=tmp_path / "runs",
                      model_preset="tiny", batch_size=2, max_steps=2, save_freq=1000, learning_rate=1e-3,
                      wandb_mode="disabled", image_aug=False, num_images_in_input=1, use_lora=True, lora_rank=4,
                      run_id="test", seed=7)
        values.update(overrides)
        return FinetuneConfig(**values)

    return make
