"""In-memory episode table of one RLDS dataset, and the native (TensorFlow-free) reader that builds it.

The table keeps every numeric array of every step in memory (a few MB for a LIBERO suite) and, per camera, the
(shard, byte offset, length) of each JPEG. A frame is then one `pread` + one JPEG decode, never an episode parse.
Shards are read once to build the index; both TFRecord CRCs are checked on the way, and a sha1 of the shard bytes
gives the dataset's content hash (the key of the statistics cache).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import simplejpeg

from prismatic.data import rlds_schema as S
from prismatic.data.example_codec import BytesRefs, ExampleFormatError, bytes_values, scan_example
from prismatic.data.image_ops import IMAGE_SIZE, resize_image_planes
from prismatic.data.rlds_catalog import DOCS_HINT, DatasetLayout
from prismatic.data.tfrecord import iter_records


@dataclass
class EpisodeTable:
    """Struct-of-arrays view of a dataset: step arrays concatenated over episodes in file order."""

    name: str
    tfds_name: str
    content_hash: str
    episode_starts: np.ndarray  # int64 (E + 1,): steps of episode e are [starts[e], starts[e+1])
    actions: np.ndarray  # float32 (S, 7) raw actions as stored
    states: np.ndarray  # float32 (S, 8)
    instruction_ids: np.ndarray  # int32 (S,) index into `instructions`
    instructions: list[str]
    file_paths: list[str]  # per episode
    image_refs: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> int64 (S, 3): shard, offset, length

    @property
    def num_episodes(self) -> int:
        return len(self.episode_starts) - 1

    @property
    def num_steps(self) -> int:
        return int(self.episode_starts[-1])

    def episode_lengths(self) -> np.ndarray:
        return np.diff(self.episode_starts)

    def episode_task(self, episode: int) -> str:
        """The task of an episode = its (first step's) language instruction."""
        return self.instructions[int(self.instruction_ids[self.episode_starts[episode]])]


def _shard_digest(path: Path, digest: hashlib._Hash) -> None:
    digest.update(path.name.encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)


def dataset_content_hash(layout: DatasetLayout) -> str:
    """sha1 over shard names and bytes: identical data under any path gives the same hash."""
    digest = hashlib.sha1()
    for path in layout.shard_files:
        _shard_digest(path, digest)
    return digest.hexdigest()


def _vector_steps(scan: dict, key: str, dim: int, num_steps: int, where: str) -> np.ndarray:
    value = scan.get(key)
    if not isinstance(value, np.ndarray) or value.size != num_steps * dim:
        got = "missing" if value is None else f"{getattr(value, 'size', '?')} values"
        raise ExampleFormatError(f"{where}: '{key}' should hold {num_steps}x{dim} floats, found {got}")
    return value.reshape(num_steps, dim).astype(np.float32)


class EpisodeTableBuilder:
    """Accumulates episodes (from either backend) into an EpisodeTable."""

    def __init__(self, name: str, tfds_name: str, cameras: tuple[str, ...]) -> None:
        self.name, self.tfds_name, self.cameras = name, tfds_name, cameras
        self.lengths: list[int] = []
        self.actions: list[np.ndarray] = []
        self.states: list[np.ndarray] = []
        self.instr_ids: list[np.ndarray] = []
        self.instr_index: dict[str, int] = {}
        self.file_paths: list[str] = []
        self.refs: dict[str, list[np.ndarray]] = {c: [] for c in cameras}

    def add(self, actions: np.ndarray, states: np.ndarray, instructions: list[str], file_path: str,
            refs: dict[str, np.ndarray], where: str | None = None) -> None:
        """One episode; `where` names it in errors (default: its episode number and file path)."""
        where = where or f"episode {len(self.lengths)} ({file_path or 'no file path'})"
        for key, values in ((S.ACTION_KEY, actions), (S.STATE_KEY, states)):
            bad = ~np.isfinite(values)
            if bad.any():  # one NaN action would make every loss and the statistics NaN (issue 23)
                step, dim = (int(i) for i in np.argwhere(bad)[0])
                raise ExampleFormatError(f"{where}: '{key}' holds a non-finite value ({values[step, dim]}) at step "
                                         f"{step}, dimension {dim} ({int(bad.sum())} non-finite values in this "
                                         "episode); actions and proprio must be finite")
        self.lengths.append(len(actions))
        self.actions.append(actions)
        self.states.append(states)
        self.instr_ids.append(np.asarray([self.instr_index.setdefault(s, len(self.instr_index))
                                          for s in instructions], dtype=np.int32))
        self.file_paths.append(file_path)
        for camera in self.cameras:
            self.refs[camera].append(refs[camera])

    def build(self, content_hash: str) -> EpisodeTable:
        if not self.lengths:
            raise ValueError(f"dataset '{self.name}' contains no episodes")
        starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        return EpisodeTable(
            name=self.name, tfds_name=self.tfds_name, content_hash=content_hash, episode_starts=starts,
            actions=np.concatenate(self.actions), states=np.concatenate(self.states),
            instruction_ids=np.concatenate(self.instr_ids), instructions=list(self.instr_index),
            file_paths=self.file_paths, image_refs={c: np.concatenate(v) for c, v in self.refs.items()})


def read_episode_table(layout: DatasetLayout, cameras: tuple[str, ...] = ("image", "wrist_image"),
                       verify_crc: bool = True) -> EpisodeTable:
    """Scan every shard once: numeric arrays into memory, JPEG positions into `image_refs`."""
    builder = EpisodeTableBuilder(layout.name, layout.tfds_name, cameras)
    digest = hashlib.sha1()
    for shard_index, path in enumerate(layout.shard_files):
        _shard_digest(path, digest)
        count = 0
        for record_offset, payload in iter_records(path, verify_crc=verify_crc):
            where = f"{path} (record {count})"
            try:
                scan = scan_example(payload)
            except ExampleFormatError as err:
                raise ExampleFormatError(f"{where}: not a valid tf.train.Example ({err})") from err
            needed = set(S.REQUIRED_KEYS) | {S.CAMERA_KEYS[c] for c in cameras}
            missing = sorted(k for k in needed if k not in scan)
            if missing:
                raise ExampleFormatError(f"{where}: missing keys {missing}; the LIBERO RLDS schema has "
                                         f"{sorted(needed)} ({DOCS_HINT})")
            language = scan[S.LANGUAGE_KEY]
            assert isinstance(language, BytesRefs)
            num_steps = len(language.offsets)
            actions = _vector_steps(scan, S.ACTION_KEY, S.ACTION_DIM, num_steps, where)
            states = _vector_steps(scan, S.STATE_KEY, S.STATE_DIM, num_steps, where)
            refs = {}
            for camera in cameras:
                images = scan[S.CAMERA_KEYS[camera]]
                if not isinstance(images, BytesRefs) or len(images.offsets) != num_steps:
                    raise ExampleFormatError(f"{where}: '{S.CAMERA_KEYS[camera]}' should hold {num_steps} JPEGs")
                refs[camera] = np.stack([np.full(num_steps, shard_index), record_offset + images.offsets,
                                         images.lengths], axis=1).astype(np.int64)
            file_ref = scan.get(S.FILE_PATH_KEY)
            file_path = (bytes_values(payload, file_ref)[0].decode() if isinstance(file_ref, BytesRefs)
                         and len(file_ref.offsets) else "")
            instructions = [b.decode("utf-8") for b in bytes_values(payload, language)]
            builder.add(actions, states, instructions, file_path, refs, where=f"{where}, episode {file_path!r}")
            count += 1
        if count != layout.shard_lengths[shard_index]:
            raise ExampleFormatError(f"{path}: holds {count} episodes but dataset_info.json lists "
                                     f"{layout.shard_lengths[shard_index]}")
    return builder.build(digest.hexdigest())


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG -> uint8 (H, W, 3) with the settings that reproduce TensorFlow's decoder exactly."""
    return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)


class NativeImageReader:
    """Reads JPEG bytes with `os.pread` from the shard files; file handles reopen after a fork (DataLoader workers)."""

    backend = "native"

    def __init__(self, layout: DatasetLayout, table: EpisodeTable) -> None:
        self.files = [str(p) for p in layout.shard_files]
        self.table = table
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"], state["_pid"] = {}, -1
        return state

    def jpeg_bytes(self, camera: str, step: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        shard, offset, length = (int(v) for v in self.table.image_refs[camera][step])
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.files[shard], os.O_RDONLY)
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise OSError(f"{self.files[shard]}: short read at byte {offset} (file changed since it was indexed?)")
        return data

    def image(self, camera: str, step: int, size: int = IMAGE_SIZE) -> np.ndarray:
        """Decoded and resized uint8 image (H, W, 3) of one step, as TF's decode_jpeg + lanczos3 antialias resize; a
        view of channel-planar memory, the batch's layout (stacking the views then copies without interleaving)."""
        return resize_image_planes(decode_jpeg(self.jpeg_bytes(camera, step)), size).transpose(1, 2, 0)

    def __del__(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
