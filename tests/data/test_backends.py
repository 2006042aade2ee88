"""Writer output read by TFDS; native reader vs TFDS backend on the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prismatic.data.rlds_catalog import resolve_dataset
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.data.rlds_episodes import NativeImageReader, decode_jpeg, read_episode_table


@pytest.fixture(scope="module")
def tf_modules():
    tf = pytest.importorskip("tensorflow", reason="tensorflow not importable (rlds-tf extra not installed)")
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not importable (rlds-tf extra)")
    return tf, tfds


def test_native_table_equals_written_episodes(libero_root):
    root, episodes = libero_root
    layout = resolve_dataset(root, "libero_10_no_noops")
    assert layout.tfds_name == "liber_o10" and len(layout.shard_files) == 2
    table = read_episode_table(layout)
    raw = episodes["libero_10_no_noops"]
    np.testing.assert_array_equal(table.actions, np.concatenate([e["action"] for e in raw]))
    np.testing.assert_array_equal(table.states, np.concatenate([e["state"] for e in raw]))
    assert [table.episode_task(i) for i in range(len(raw))] == [e["language_instruction"] for e in raw]
    assert table.file_paths == [e["file_path"] for e in raw]
    reader = NativeImageReader(layout, table)
    for step, (e, t) in enumerate([(0, 0), (0, 11), (5, 3)]):
        index = int(table.episode_starts[e]) + t
        decoded = decode_jpeg(reader.jpeg_bytes("image", index))
        # JPEG is lossy: the synthetic scene has flat areas, so the decoded image stays close to the original
        assert np.abs(decoded.astype(int) - raw[e]["image"][t].astype(int)).mean() < 2.0, step


@pytest.mark.tf
def test_tfds_reads_writer_output(libero_root, tf_modules):
    _, tfds = tf_modules
    root, episodes = libero_root
    builder = tfds.builder_from_directory(str(root / "libero_10_no_noops" / "1.0.0"))
    assert builder.info.name == "liber_o10"
    assert builder.info.splits["train"].num_examples == len(episodes["libero_10_no_noops"])
    info = json.loads((root / "libero_10_no_noops" / "1.0.0" / "dataset_info.json").read_text())
    lengths = [int(n) for n in info["splits"][0]["shardLengths"]]
    assert len(lengths) == 2 and sum(lengths) == len(episodes["libero_10_no_noops"]) and min(lengths) >= 4
    first = next(iter(builder.as_dataset(split="train", shuffle_files=False)))
    steps = next(iter(first["steps"].batch(100)))
    raw = episodes["libero_10_no_noops"][0]
    np.testing.assert_array_equal(steps["action"].numpy(), raw["action"])
    np.testing.assert_array_equal(steps["observation"]["joint_state"].numpy(), raw["joint_state"])
    assert steps["observation"]["image"].shape == (12, 256, 256, 3)
    assert steps["is_first"].numpy().tolist() == [True] + [False] * 11
    assert steps["is_last"].numpy().tolist() == [False] * 11 + [True]
    assert first["episode_metadata"]["file_path"].numpy().decode() == raw["file_path"]


@pytest.mark.tf
def test_native_and_tf_backend_give_same_samples(libero_root, tokenizer, tf_modules):
    root, _ = libero_root
    kwargs = dict(num_images_in_input=2, use_proprio=True, image_aug=False, seed=3)
    native = RLDSFrameDataset(root, "libero_10_no_noops", tokenizer, backend="native", **kwargs)
    tfb = RLDSFrameDataset(root, "libero_10_no_noops", tokenizer, backend="tf", **kwargs)
    t_native, t_tf = native.sources[0].table, tfb.sources[0].table
    np.testing.assert_array_equal(t_native.actions, t_tf.actions)
    np.testing.assert_array_equal(t_native.states, t_tf.states)
    np.testing.assert_array_equal(t_native.episode_starts, t_tf.episode_starts)
    assert t_native.instructions == t_tf.instructions and t_native.content_hash == t_tf.content_hash
    assert native.num_frames == tfb.num_frames
    worst = 0
    for position in range(native.num_frames):  # the stream positions of one epoch: every frame once
        a, b = native[position], tfb[position]
        for key in ("actions", "proprio", "input_ids"):
            np.testing.assert_array_equal(a[key], b[key])
        assert (a["sample_id"], a["content_hash"], a["instruction"]) == (b["sample_id"], b["content_hash"],
                                                                          b["instruction"])
        worst = max(worst, int(np.abs(a["images"].astype(int) - b["images"].astype(int)).max()))
    assert worst <= 1
