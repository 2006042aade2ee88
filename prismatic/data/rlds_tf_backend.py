"""TFDS / tf.data backend (the `rlds-tf` extra): reads the same folders through `tfds.builder_from_directory`.

It fills the same `EpisodeTable` as the native reader and decodes/resizes with TensorFlow ops (decode_jpeg,
lanczos3 + antialias, round, clip), so everything downstream (statistics, sampling, augmentation, collation) is
shared and the two backends can be compared sample by sample. JPEG bytes are held in memory: meant for checking
the native path and for machines where TensorFlow is the preferred reader, not for the largest mixtures.
"""

from __future__ import annotations

import numpy as np

from prismatic.data import rlds_schema as S
from prismatic.data.image_ops import IMAGE_SIZE
from prismatic.data.rlds_catalog import DatasetLayout
from prismatic.data.rlds_episodes import EpisodeTable, EpisodeTableBuilder, dataset_content_hash


def _import_tf():
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("backend='tf' needs TensorFlow and tensorflow-datasets: install the `rlds-tf` extra "
                          "(pip install '.[rlds-tf]') or use backend='native'") from err
    tf.config.set_visible_devices([], "GPU")
    return tf, tfds


def read_episode_table_tf(layout: DatasetLayout, cameras: tuple[str, ...] = ("image", "wrist_image")
                          ) -> tuple[EpisodeTable, TFImageReader]:
    """Read all episodes with TFDS (file order, no shuffling) into an EpisodeTable + an in-memory image reader."""
    tf, tfds = _import_tf()
    builder = tfds.builder_from_directory(str(layout.directory))
    skip = {camera: tfds.decode.SkipDecoding() for camera in cameras}
    dataset = builder.as_dataset(split=S.SPLIT, shuffle_files=False, decoders={"steps": {"observation": skip}})
    table_builder = EpisodeTableBuilder(layout.name, layout.tfds_name, cameras)
    jpegs: dict[str, list[bytes]] = {c: [] for c in cameras}
    step = 0
    for episode in dataset:
        steps = next(iter(episode["steps"].batch(1 << 20)))  # all steps of the episode as one batch
        actions = steps["action"].numpy().astype(np.float32)
        states = steps["observation"]["state"].numpy().astype(np.float32)
        instructions = [b.decode("utf-8") for b in steps["language_instruction"].numpy().tolist()]
        n = len(actions)
        refs = {}
        for camera in cameras:
            jpegs[camera].extend(steps["observation"][camera].numpy().tolist())
            refs[camera] = np.stack([np.zeros(n), np.arange(step, step + n), np.zeros(n)], axis=1).astype(np.int64)
        file_path = episode["episode_metadata"]["file_path"].numpy().decode("utf-8")
        table_builder.add(actions, states, instructions, file_path, refs)
        step += n
    table = table_builder.build(dataset_content_hash(layout))
    return table, TFImageReader(table, jpegs)


class TFImageReader:
    """JPEG bytes from memory; decode and resize with TensorFlow ops (as the upstream tf.data pipeline does)."""

    backend = "tf"

    def __init__(self, table: EpisodeTable, jpegs: dict[str, list[bytes]]) -> None:
        self.table = table
        self.jpegs = jpegs

    def jpeg_bytes(self, camera: str, step: int) -> bytes:
        return self.jpegs[camera][int(self.table.image_refs[camera][step, 1])]

    def image(self, camera: str, step: int, size: int = IMAGE_SIZE) -> np.ndarray:
        tf, _ = _import_tf()
        image = tf.io.decode_jpeg(self.jpeg_bytes(camera, step), channels=3)
        if tuple(image.shape[:2]) != (size, size):
            image = tf.image.resize(image, (size, size), method="lanczos3", antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image.numpy()
