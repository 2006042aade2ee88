"""Fixtures of the run-safety tests: a tiny synthetic dataset and one finished tiny run."""

from __future__ import annotations

from pathlib import Path

import pytest
from safety_helpers import DATASET


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    from prismatic.data.synthetic_libero import make_synthetic_libero_dataset

    root = tmp_path_factory.mktemp("rlds")
    make_synthetic_libero_dataset(root, DATASET, num_tasks=2, episodes_per_task=2, steps=12, seed=0)
    return root


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_root) -> Path:
    """A tiny LoRA run (rank 4, 2 steps, a checkpoint per step) written by train(): returns its run root."""
    from finetune import train
    from prismatic.training.finetune_config import FinetuneConfig

    run_root = tmp_path_factory.mktemp("finished") / "runs"
    train(FinetuneConfig(data_root_dir=data_root, dataset_name=DATASET, run_root_dir=run_root, model_preset="tiny",
                         batch_size=1, max_steps=2, save_freq=1, num_images_in_input=1, image_aug=False,
                         wandb_mode="disabled", lora_rank=4, run_id="done"))
    return run_root
