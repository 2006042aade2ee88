"""benchmarks/bench_dataloader.py: its tf.data comparison pipeline reads the same frames at the same size, and the
CLI answers bad arguments with one line."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf  # noqa: F401  pinned in requirements.txt: the real tool, never skipped
import torch

from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.models.image_transform import DINO_STD, images_to_pixel_values, planar_images_to_pixel_values

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_dataloader.py"
NAME = "libero_10_no_noops"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dataloader", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.tf
def test_tf_data_pipeline_gives_the_loader_frames(libero_root, tokenizer):
    """Without augmentation each tf.data frame is a frame of the dataset: its action identifies the step, and its
    pixel values equal the native loader's for that step within one uint8 level (TF lanczos3 vs PIL Lanczos)."""
    root, _ = libero_root
    bench = _bench()
    native = RLDSFrameDataset(root, NAME, tokenizer, num_images_in_input=2)
    table = native.sources[0].table
    pipeline = bench.make_tf_data_pipeline(root, NAME, batch_size=4, augment=False, shuffle_buffer=8)
    level = 1.0 / (255.0 * min(DINO_STD)) + 1e-5  # one uint8 level after the largest normalisation scale
    seen = set()
    for batch in pipeline.take(3):
        images = torch.from_numpy(batch["images"].numpy())
        assert images.shape == (4, 2, 3, 224, 224) and images.dtype == torch.uint8  # the loader's batch layout
        pixel_values = planar_images_to_pixel_values(images)
        for action, instruction, pixels in zip(batch["action"].numpy(), batch["instruction"].numpy(), pixel_values,
                                               strict=True):
            step = int(np.flatnonzero((table.actions == action).all(axis=1))[0])
            assert table.instructions[int(table.instruction_ids[step])] == instruction.decode()
            images = np.stack([native.sources[0].reader.image(camera, step) for camera in ("image", "wrist_image")])
            torch.testing.assert_close(pixels, images_to_pixel_values(images), rtol=0, atol=level)
            seen.add(step)
    assert len(seen) > 4  # shuffled frames from several places, not one frame repeated

    augmented = next(iter(bench.make_tf_data_pipeline(root, NAME, batch_size=4, augment=True)))
    augmented_pixels = planar_images_to_pixel_values(torch.from_numpy(augmented["images"].numpy())).numpy()
    for action, pixels in zip(augmented["action"].numpy(), augmented_pixels, strict=True):
        step = int(np.flatnonzero((table.actions == action).all(axis=1))[0])
        images = np.stack([native.sources[0].reader.image(camera, step) for camera in ("image", "wrist_image")])
        assert np.abs(pixels - images_to_pixel_values(images).numpy()).max() > 10 * level  # augmentation is on


def test_cli_rejects_bad_arguments_in_one_line(capsys):
    bench = _bench()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--num_workers", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --num_workers must be >= 0")
