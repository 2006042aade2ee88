"""Write RLDS datasets in the exact LIBERO schema (one tf.train.Example per episode, TFRecord shards + TFDS JSON).

Used by the tests and the embedded demo dataset. The whole folder is assembled under a temporary name and renamed
into place at the end, so an error never leaves a half-written dataset behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg

from prismatic.data import rlds_schema as S
from prismatic.data.example_codec import encode_example
from prismatic.data.tfrecord import write_records

JPEG_QUALITY = 95


def _jpeg_list(images: Any, num_steps: int, what: str, image_shape: tuple[int, int, int]) -> list[bytes]:
    """Accept (T, H, W, 3) uint8 arrays (encoded here) or a list of T JPEG byte strings (kept as they are)."""
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], bytes):
        if len(images) != num_steps:
            raise ValueError(f"{what}: {len(images)} JPEG frames for {num_steps} steps")
        return list(images)
    array = np.asarray(images)
    if array.shape != (num_steps, *image_shape) or array.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 images of shape {(num_steps, *image_shape)}, "
                         f"got {array.shape} {array.dtype}")
    return [simplejpeg.encode_jpeg(np.ascontiguousarray(im), quality=JPEG_QUALITY, colorspace="RGB") for im in array]


def _vector(episode: Mapping[str, Any], key: str, num_steps: int, dim: int, idx: int) -> np.ndarray:
    value = np.asarray(episode[key], dtype=np.float32)
    if value.shape != (num_steps, dim):
        raise ValueError(f"episode {idx}: '{key}' must have shape {(num_steps, dim)}, got {value.shape}")
    if not np.all(np.isfinite(value)):
        raise ValueError(f"episode {idx}: '{key}' contains NaN or inf")
    return value


def encode_episode(episode: Mapping[str, Any], idx: int = 0,
                   image_shape: tuple[int, int, int] = S.IMAGE_SHAPE) -> bytes:
    """Serialise one episode dict to a LIBERO-schema tf.train.Example.

    Keys: `image`, `wrist_image` ((T,H,W,3) uint8 or T JPEG bytes), `state` (T,8), `joint_state` (T,7), `action`
    (T,7), `language_instruction` (str), optional `reward`, `discount`, `is_terminal` (T,), `file_path` (str).
    """
    missing = [k for k in ("image", "wrist_image", "state", "joint_state", "action", "language_instruction")
               if k not in episode]
    if missing:
        raise KeyError(f"episode {idx} lacks keys {missing}")
    action = np.asarray(episode["action"])
    if action.ndim != 2 or action.shape[0] < 1:
        raise ValueError(f"episode {idx}: 'action' must have shape (T, {S.ACTION_DIM}) with T >= 1, got {action.shape}")
    num_steps = action.shape[0]
    instruction = episode["language_instruction"]
    if not isinstance(instruction, str) or not instruction:
        raise ValueError(f"episode {idx}: 'language_instruction' must be a non-empty str")
    last = np.zeros(num_steps, dtype=np.int64)
    last[-1] = 1
    first = np.zeros(num_steps, dtype=np.int64)
    first[0] = 1
    reward = np.asarray(episode.get("reward", last), dtype=np.float32).reshape(num_steps)
    discount = np.asarray(episode.get("discount", np.ones(num_steps)), dtype=np.float32).reshape(num_steps)
    terminal = np.asarray(episode.get("is_terminal", last), dtype=np.int64).reshape(num_steps)
    features = {
        S.FILE_PATH_KEY: [str(episode.get("file_path", f"episode_{idx:06d}")).encode()],
        S.ACTION_KEY: _vector(episode, "action", num_steps, S.ACTION_DIM, idx),
        S.DISCOUNT_KEY: discount,
        S.IS_FIRST_KEY: first,
        S.IS_LAST_KEY: last,
        S.IS_TERMINAL_KEY: terminal,
        S.LANGUAGE_KEY: [instruction.encode()] * num_steps,
        S.IMAGE_KEY: _jpeg_list(episode["image"], num_steps, f"episode {idx} image", image_shape),
        S.JOINT_STATE_KEY: _vector(episode, "joint_state", num_steps, S.JOINT_STATE_DIM, idx),
        S.STATE_KEY: _vector(episode, "state", num_steps, S.STATE_DIM, idx),
        S.WRIST_IMAGE_KEY: _jpeg_list(episode["wrist_image"], num_steps, f"episode {idx} wrist_image", image_shape),
        S.REWARD_KEY: reward,
    }
    return encode_example(features)


def write_rlds_dataset(data_root_dir: str | Path, dataset_name: str, episodes: Sequence[Mapping[str, Any]],
                       tfds_name: str | None = None, num_shards: int = 1, overwrite: bool = False,
                       image_shape: tuple[int, int, int] = S.IMAGE_SHAPE) -> Path:
    """Write `{data_root_dir}/{dataset_name}/1.0.0/` in the LIBERO RLDS layout; returns the version folder.

    Episodes are split into `num_shards` contiguous shards (episode order = shard order, then record order).
    `tfds_name` (default: `dataset_name`) names the shards and goes into dataset_info.json.
    """
    if not episodes:
        raise ValueError("write_rlds_dataset needs at least one episode")
    if not 1 <= num_shards <= len(episodes):
        raise ValueError(f"num_shards must be in [1, {len(episodes)}] (number of episodes), got {num_shards}")
    tfds_name = tfds_name or dataset_name
    root = Path(data_root_dir)
    target = root / dataset_name
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists (pass overwrite=True to replace it)")
    root.mkdir(parents=True, exist_ok=True)
    payloads = [encode_episode(ep, i, image_shape) for i, ep in enumerate(episodes)]  # validate all before writing
    bounds = np.linspace(0, len(payloads), num_shards + 1).round().astype(int)
    staging = Path(tempfile.mkdtemp(prefix=f".{dataset_name}.", dir=root))
    try:
        version_dir = staging / S.VERSION
        version_dir.mkdir()
        num_bytes, lengths = 0, []
        for i in range(num_shards):
            shard = payloads[bounds[i]:bounds[i + 1]]
            num_bytes += write_records(version_dir / S.shard_file_name(tfds_name, i, num_shards), shard)
            lengths.append(len(shard))
        (version_dir / "features.json").write_text(json.dumps(S.features_json(image_shape), indent=4))
        info = S.dataset_info_json(tfds_name, lengths, num_bytes, description=f"{dataset_name} (LIBERO RLDS schema)")
        (version_dir / "dataset_info.json").write_text(json.dumps(info, indent=2))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target / S.VERSION
