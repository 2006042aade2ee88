"""Few-shot truncation and every bad-input path: missing folder, corrupt shard, unknown name, short episodes."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest
from rlds_test_data import make_episodes

from prismatic.data.few_shot import EmptySelectionError, select_few_shot_episodes
from prismatic.data.rlds_catalog import DatasetNotFoundError, parse_dataset_spec, resolve_dataset
from prismatic.data.rlds_dataset import RLDSFrameDataset, held_out_episodes
from prismatic.data.rlds_writer import write_rlds_dataset
from prismatic.data.tfrecord import CorruptTFRecordError

NAME = "libero_10_no_noops"


def _episode_ids(ds: RLDSFrameDataset) -> set[int]:
    return {int(e) for e in np.unique(ds.sources[0].frame_episode)}


def test_few_shot_keeps_n_per_task_and_writes_file(libero_root, tokenizer, tmp_path):
    root, episodes = libero_root
    raw = episodes[NAME]
    ds = RLDSFrameDataset(root, NAME, tokenizer, num_demos_per_task=2, seed=4)
    kept = _episode_ids(ds)
    tasks = Counter(raw[e]["language_instruction"] for e in kept)
    assert set(tasks.values()) == {2} and len(tasks) == 3
    path = ds.save_few_shot_episodes(tmp_path)
    record = json.loads(path.read_text())
    assert path.name == "few_shot_episodes.json" and record["num_demos_per_task"] == 2 and record["seed"] == 4
    listed = {e for ids in record["datasets"][NAME].values() for e in ids}
    assert listed == kept
    for task, ids in record["datasets"][NAME].items():
        assert all(raw[e]["language_instruction"] == task for e in ids)
    again = RLDSFrameDataset(root, NAME, tokenizer, num_demos_per_task=2, seed=4)
    assert _episode_ids(again) == kept
    choices = {frozenset(_episode_ids(RLDSFrameDataset(root, NAME, tokenizer, num_demos_per_task=1, seed=s)))
               for s in range(6)}
    assert len(choices) > 1  # the seed drives the choice
    many = RLDSFrameDataset(root, NAME, tokenizer, num_demos_per_task=50)
    assert _episode_ids(many) == set(range(len(raw)))  # fewer than N available: all kept


def test_few_shot_selection_is_per_task_stable():
    tasks = {i: f"task {i % 3}" for i in range(12)}
    full = select_few_shot_episodes(tasks, 2, seed=0)
    subset = select_few_shot_episodes({i: t for i, t in tasks.items() if t != "task 2"}, 2, seed=0)
    assert subset == {k: v for k, v in full.items() if k != "task 2"}


def test_empty_few_shot_selection_errors(libero_root, tokenizer):
    root, _ = libero_root
    with pytest.raises(EmptySelectionError, match="num_demos_per_task must be an integer >= 1"):
        RLDSFrameDataset(root, NAME, tokenizer, num_demos_per_task=0)
    with pytest.raises(EmptySelectionError, match="zero episodes"):
        select_few_shot_episodes({}, 3, seed=0)
    ds = RLDSFrameDataset(root, NAME, tokenizer)
    with pytest.raises(ValueError, match="without num_demos_per_task"):
        ds.save_few_shot_episodes("/nonexistent")


def test_val_split_is_held_out(libero_root, tokenizer):
    root, _ = libero_root
    train = RLDSFrameDataset(root, NAME, tokenizer, val_fraction=0.3, seed=2)
    val = RLDSFrameDataset(root, NAME, tokenizer, val_fraction=0.3, seed=2, split="val")
    held = set(held_out_episodes(9, 0.3, 2).tolist())
    assert _episode_ids(val) == held and len(held) == 3
    assert not _episode_ids(train) & held and _episode_ids(train) | held == set(range(9))
    with pytest.raises(ValueError, match="val_fraction > 0"):
        RLDSFrameDataset(root, NAME, tokenizer, split="val")


def test_missing_folder_names_layout_and_docs(tmp_path, tokenizer):
    with pytest.raises(DatasetNotFoundError) as err:
        RLDSFrameDataset(tmp_path, "libero_spatial_no_noops", tokenizer)
    message = str(err.value)
    assert "libero_spatial_no_noops/1.0.0" in message and "docs/DATASETS.md" in message
    assert "libero_spatial-train.tfrecord" in message


def test_unknown_dataset_name(tmp_path, tokenizer):
    with pytest.raises(DatasetNotFoundError, match="unknown dataset 'libero_spatail'.*libero_spatial_no_noops"):
        resolve_dataset(tmp_path, "libero_spatail")
    assert parse_dataset_spec("libero_4_task_suites_no_noops")[3] == ("libero_10_no_noops", 1.0)


def test_missing_shard_and_corrupt_shard(tmp_path, tokenizer):
    episodes = make_episodes(1, 2, [10], seed=3)
    version = write_rlds_dataset(tmp_path, NAME, episodes, tfds_name="liber_o10", num_shards=2)
    shard = version / "liber_o10-train.tfrecord-00001-of-00002"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x55
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptTFRecordError, match="liber_o10-train.tfrecord-00001-of-00002.*CRC"):
        RLDSFrameDataset(tmp_path, NAME, tokenizer)
    shard.unlink()
    with pytest.raises(DatasetNotFoundError, match="missing 1 of 2 shards.*00001-of-00002"):
        RLDSFrameDataset(tmp_path, NAME, tokenizer)


def test_short_episodes_are_skipped_with_warning(tmp_path, tokenizer, caplog):
    episodes = make_episodes(1, 3, [10, 5, 8], seed=5)  # 3 frames, none, 1 frame
    write_rlds_dataset(tmp_path, NAME, episodes, tfds_name="liber_o10")
    with caplog.at_level(logging.WARNING):
        ds = RLDSFrameDataset(tmp_path, NAME, tokenizer)
    assert ds.skipped_episodes == {NAME: [1]} and "shorter than the 8-step action chunk" in caplog.text
    assert ds.num_frames == 3 + 1
    assert ds.dataset_statistics[NAME]["num_transitions"] == 23  # statistics still count every transition
    write_rlds_dataset(tmp_path, "all_short", make_episodes(1, 2, [4], seed=6))
    with pytest.raises(ValueError, match="has no frame.*shorter than the 8-step action chunk"):
        RLDSFrameDataset(tmp_path, "all_short", tokenizer)


def test_writer_rejects_bad_episodes_without_writing(tmp_path):
    episodes = make_episodes(1, 2, [10], seed=7)
    episodes[1]["state"] = episodes[1]["state"][:, :7]
    with pytest.raises(ValueError, match=r"episode 1: 'state' must have shape \(10, 8\), got \(10, 7\)"):
        write_rlds_dataset(tmp_path, NAME, episodes)
    assert not any(tmp_path.iterdir())
    with pytest.raises(FileExistsError):
        write_rlds_dataset(tmp_path, NAME, make_episodes(1, 1, [9], seed=0))
        write_rlds_dataset(tmp_path, NAME, make_episodes(1, 1, [9], seed=0))


def test_bad_options(libero_root, tokenizer):
    root, _ = libero_root
    with pytest.raises(ValueError, match="num_images_in_input must be 1 or 2"):
        RLDSFrameDataset(root, NAME, tokenizer, num_images_in_input=3)
    with pytest.raises(ValueError, match="backend must be"):
        RLDSFrameDataset(root, NAME, tokenizer, backend="dlimp")
