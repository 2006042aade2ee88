"""Map-style RLDS frame dataset: one item = one frame with its 8-step action chunk, images, proprio and prompt.

Items are addressed by *stream position* (see `stream.py`): position -> (epoch, dataset, frame) through a seeded
per-epoch order, and the random augmentation of that item is drawn from (seed, position, camera). `get_frame`
addresses frames directly (file order, no augmentation draw) for evaluation and feature caching.

Splits: with `val_fraction > 0`, that share of each dataset's episodes (chosen by seed) is held out as `split="val"`
and removed from `split="train"`. Few-shot (`num_demos_per_task`) then keeps N train episodes per task.
Episodes shorter than the chunk (8 steps) yield no frame (the last 7 frames of every episode are dropped); they are
skipped with a warning and listed in `skipped_episodes`. Statistics always cover all episodes of the files.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch.utils.data import Dataset

from prismatic.data.augmentation import DEFAULT_AUGMENTATION, AugmentationConfig, augment_image
from prismatic.data.few_shot import EmptySelectionError, select_few_shot_episodes, write_few_shot_episodes
from prismatic.data.image_ops import IMAGE_SIZE, crop_resize_bilinear_planes
from prismatic.data.libero_transform import NUM_ACTIONS_CHUNK, chunk_indices, num_chunk_frames, transform_actions
from prismatic.data.normalization import normalize_bounds_q99
from prismatic.data.rlds_catalog import DatasetSpec, parse_dataset_spec, resolve_dataset
from prismatic.data.rlds_episodes import EpisodeTable, NativeImageReader, read_episode_table
from prismatic.data.statistics import cached_statistics, save_dataset_statistics
from prismatic.data.stream import EpochOrder
from prismatic.models.prompting import tokenize_prompt

logger = logging.getLogger(__name__)

CAMERAS = ("image", "wrist_image")
VAL_TAG = 0x56414C


@dataclass
class _Source:
    """One dataset of the (mixture) stream, after split / few-shot / chunk filtering."""

    name: str
    weight: float
    table: EpisodeTable
    reader: Any  # NativeImageReader | TFImageReader
    statistics: dict[str, Any]
    frame_episode: np.ndarray  # int64 (F,)
    frame_step: np.ndarray  # int64 (F,) step within the episode
    actions: np.ndarray  # float32 (S, 7) transformed, not normalised
    norm_actions: np.ndarray  # float32 (S, 7) normalised
    norm_proprio: np.ndarray  # float32 (S, 8) normalised


def held_out_episodes(num_episodes: int, val_fraction: float, seed: int) -> np.ndarray:
    """Sorted episode ids of the validation split: round(fraction * E) episodes (at least 1, at most E - 1)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        return np.zeros(0, dtype=np.int64)
    count = min(max(1, round(val_fraction * num_episodes)), num_episodes - 1)
    if count < 1:
        raise ValueError(f"cannot hold out validation episodes from a dataset with {num_episodes} episode(s)")
    return np.sort(np.random.default_rng([int(seed), VAL_TAG]).permutation(num_episodes)[:count])


class RLDSFrameDataset(Dataset):
    """Frames of one RLDS dataset or a weighted mixture, ready for `VLACollator`.

    Args:
        data_root_dir: folder holding `{dataset_name}/1.0.0/` (see docs/DATASETS.md).
        dataset_name: a dataset name, a registered mixture, "a:0.7,b:0.3", [(name, weight)] or {name: weight}.
        tokenizer: HF tokenizer; prompts become `tokenize_prompt(tokenizer, instruction)` (BOS + prompt ids).
        num_images_in_input: 1 (third-person camera) or 2 (+ wrist camera).
        use_proprio: recorded for the consumer; the normalised proprio is always part of the sample.
        image_aug: random crop + colour jitter on the training stream; center crop for `get_frame` and split="val".
        seed: drives the stream order, augmentation, validation hold-out and few-shot choice.
        num_demos_per_task: keep this many train episodes per task (None = all).
        split: "train" or "val" (needs val_fraction > 0).
        statistics: precomputed {name: entry} (e.g. a checkpoint's dataset_statistics.json); default: computed.
        statistics_cache_dir: where computed statistics are cached by content hash (None = no cache).
        backend: "native" (default, no TensorFlow) or "tf" (TFDS / tf.data, `rlds-tf` extra).
    """

    def __init__(self, data_root_dir: str | Path, dataset_name: DatasetSpec, tokenizer: Any,
                 num_images_in_input: int = 1, use_proprio: bool = False, image_aug: bool = False, seed: int = 7,
                 num_demos_per_task: int | None = None, split: Literal["train", "val"] = "train",
                 val_fraction: float = 0.0, statistics: dict[str, Any] | None = None,
                 statistics_cache_dir: str | Path | None = None, backend: Literal["native", "tf"] = "native",
                 chunk_size: int = NUM_ACTIONS_CHUNK, image_size: int = IMAGE_SIZE, verify_crc: bool = True,
                 augmentation: AugmentationConfig = DEFAULT_AUGMENTATION) -> None:
        if num_images_in_input not in (1, 2):
            raise ValueError(f"num_images_in_input must be 1 or 2, got {num_images_in_input}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if split == "val" and val_fraction <= 0.0:
            raise ValueError("split='val' needs val_fraction > 0 (the share of episodes held out for validation)")
        if backend not in ("native", "tf"):
            raise ValueError(f"backend must be 'native' or 'tf', got {backend!r}")
        self.pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if self.pad_token_id is None:
            raise ValueError("tokenizer.pad_token_id is None: the collator right-pads prompts, set a pad token "
                             "(Qwen2.5 uses <|endoftext|>)")
        self.data_root_dir = Path(data_root_dir)
        self.num_images_in_input, self.use_proprio, self.image_aug = num_images_in_input, use_proprio, image_aug
        self.seed, self.split, self.backend = int(seed), split, backend
        self.num_demos_per_task, self.chunk_size, self.image_size = num_demos_per_task, chunk_size, image_size
        self.augmentation = augmentation
        self.cameras = CAMERAS[:num_images_in_input]
        self.skipped_episodes: dict[str, list[int]] = {}
        self.few_shot_episodes: dict[str, dict[str, list[int]]] | None = None
        self._few_shot_available: dict[str, dict[str, int]] = {}
        self.sources = [self._load_source(name, weight, tokenizer, statistics, statistics_cache_dir, val_fraction,
                                          verify_crc) for name, weight in parse_dataset_spec(dataset_name)]
        self.dataset_statistics = {s.name: s.statistics for s in self.sources}
        self.order = EpochOrder([len(s.frame_step) for s in self.sources], [s.weight for s in self.sources],
                                self.seed)
        instructions = sorted({text for s in self.sources for text in s.table.instructions})
        self._prompt_ids = {text: np.asarray(tokenize_prompt(tokenizer, text), dtype=np.int64)
                            for text in instructions}
        self._frame_offsets = np.concatenate([[0], np.cumsum([len(s.frame_step) for s in self.sources])])

    # ----------------------------------------------------------------------------------------------- construction
    def _load_source(self, name: str, weight: float, tokenizer: Any, statistics: dict[str, Any] | None,
                     cache_dir: str | Path | None, val_fraction: float, verify_crc: bool) -> _Source:
        layout = resolve_dataset(self.data_root_dir, name)
        if self.backend == "tf":
            from prismatic.data.rlds_tf_backend import read_episode_table_tf

            table, reader = read_episode_table_tf(layout, self.cameras)
        else:
            table = read_episode_table(layout, self.cameras, verify_crc=verify_crc)
            reader = NativeImageReader(layout, table)
        if statistics is not None:
            if name not in statistics:
                raise KeyError(f"the statistics given have no entry for dataset '{name}' "
                               f"(entries: {sorted(statistics)})")
            stats = statistics[name]
        else:
            stats = cached_statistics(table, cache_dir)
        episodes = self._split_episodes(table, val_fraction)
        lengths = table.episode_lengths()
        counts = np.asarray([num_chunk_frames(int(lengths[e]), self.chunk_size) for e in episodes], dtype=np.int64)
        short = [int(e) for e, c in zip(episodes, counts, strict=True) if c == 0]
        if short:
            logger.warning("%s: skipping %d episode(s) shorter than the %d-step action chunk: %s", name, len(short),
                           self.chunk_size, short[:20])
            self.skipped_episodes[name] = short
        if counts.sum() == 0:
            raise ValueError(f"dataset '{name}' ({self.split} split) has no frame: every selected episode is "
                             f"shorter than the {self.chunk_size}-step action chunk "
                             f"(lengths {lengths[episodes].tolist()[:20]})")
        frame_episode = np.repeat(np.asarray(episodes, dtype=np.int64), counts)
        frame_step = np.concatenate([np.arange(c) for c in counts]).astype(np.int64)
        actions = transform_actions(table.actions)
        return _Source(name=name, weight=weight, table=table, reader=reader, statistics=stats,
                       frame_episode=frame_episode, frame_step=frame_step, actions=actions,
                       norm_actions=normalize_bounds_q99(actions, stats["action"], "action"),
                       norm_proprio=normalize_bounds_q99(table.states, stats["proprio"], "proprio"))

    def _split_episodes(self, table: EpisodeTable, val_fraction: float) -> np.ndarray:
        held_out = held_out_episodes(table.num_episodes, val_fraction, self.seed)
        if self.split == "val":
            return held_out
        episodes = np.setdiff1d(np.arange(table.num_episodes), held_out)
        if self.num_demos_per_task is None:
            return episodes
        tasks = {int(e): table.episode_task(int(e)) for e in episodes}
        selection = select_few_shot_episodes(tasks, self.num_demos_per_task, self.seed)
        chosen = np.asarray(sorted(e for ids in selection.values() for e in ids), dtype=np.int64)
        if chosen.size == 0:
            raise EmptySelectionError(f"few-shot selection on '{table.name}' kept no episode")
        if self.few_shot_episodes is None:
            self.few_shot_episodes = {}
        self.few_shot_episodes[table.name] = selection
        self._few_shot_available[table.name] = {t: sum(1 for v in tasks.values() if v == t) for t in selection}
        return chosen

    # ------------------------------------------------------------------------------------------------ access
    def __len__(self) -> int:
        """Frames in one epoch of the stream (stream positions beyond it wrap into later epochs)."""
        return self.order.epoch_length

    @property
    def num_frames(self) -> int:
        return int(self._frame_offsets[-1])

    def __getitem__(self, position: int) -> dict[str, Any]:
        """Sample at stream position `position` (training view: seeded order and, with image_aug, augmentation)."""
        _, d, local = self.order.lookup(position)
        augment = self.image_aug and self.split == "train"
        return self._sample(d, local, position if augment else None)

    def get_frame(self, frame_index: int) -> dict[str, Any]:
        """Frame `frame_index` in file order (datasets concatenated), evaluation view (center crop if image_aug)."""
        if not 0 <= frame_index < self.num_frames:
            raise IndexError(f"frame {frame_index} outside [0, {self.num_frames})")
        d = int(np.searchsorted(self._frame_offsets, frame_index, side="right") - 1)
        return self._sample(d, int(frame_index - self._frame_offsets[d]), None)

    def _image(self, source: _Source, camera_index: int, step: int, position: int | None) -> tuple[np.ndarray, bytes]:
        camera = self.cameras[camera_index]
        data = source.reader.jpeg_bytes(camera, step)
        image = source.reader.image(camera, step, self.image_size)
        if position is not None:
            rng = np.random.default_rng([self.seed, int(position), camera_index])
            image = augment_image(image, rng, self.augmentation, self.image_size)
        elif self.image_aug:  # `center_crop`, kept channel-planar like the augmented view
            image = crop_resize_bilinear_planes(image, self.augmentation.crop_area, 0.5, 0.5,
                                                self.image_size).transpose(1, 2, 0)
        return image, data

    def _sample(self, d: int, local: int, position: int | None) -> dict[str, Any]:
        source = self.sources[d]
        episode, t = int(source.frame_episode[local]), int(source.frame_step[local])
        start = int(source.table.episode_starts[episode])
        length = int(source.table.episode_starts[episode + 1]) - start
        step = start + t
        chunk = start + chunk_indices(t, length, self.chunk_size)
        instruction = source.table.instructions[int(source.table.instruction_ids[step])]
        images, digest = [], hashlib.sha1()
        for camera_index in range(len(self.cameras)):
            image, data = self._image(source, camera_index, step, position)
            images.append(image)
            digest.update(data)
        digest.update(instruction.encode("utf-8"))
        return {
            # (N, H, W, 3) stored channel-planar when the views are: the collator's layout, and no interleaving copy
            "images": np.stack([image.transpose(2, 0, 1) for image in images]).transpose(0, 2, 3, 1),
            "input_ids": self._prompt_ids[instruction],
            "actions": source.norm_actions[chunk],
            "proprio": source.norm_proprio[step],
            "instruction": instruction,
            "sample_id": f"{source.name}/{episode:06d}/{t:04d}",
            "content_hash": digest.hexdigest(),
            "dataset_name": source.name,
        }

    # ------------------------------------------------------------------------------------------------ outputs
    def save_dataset_statistics(self, run_dir: str | Path) -> Path:
        """Write `{run_dir}/dataset_statistics.json` (upstream format)."""
        return save_dataset_statistics(self.dataset_statistics, run_dir)

    def save_few_shot_episodes(self, run_dir: str | Path) -> Path:
        """Write `{run_dir}/few_shot_episodes.json`; only for few-shot datasets."""
        if self.few_shot_episodes is None:
            raise ValueError("this dataset was built without num_demos_per_task: no few-shot selection to save")
        return write_few_shot_episodes(run_dir, self.few_shot_episodes, int(self.num_demos_per_task or 0), self.seed,
                                       self._few_shot_available)
