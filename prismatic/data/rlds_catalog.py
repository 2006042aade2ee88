"""Where RLDS datasets live on disk and which names they go by.

Layout: `{data_root_dir}/{dataset_name}/{version}/` holding `dataset_info.json`, `features.json` and
`{tfds_name}-train.tfrecord-NNNNN-of-MMMMM` shards. The published LIBERO folders carry a TFDS name that differs
from the folder name (`liber_o10` inside `libero_10_no_noops`), so the shard names are read from
`dataset_info.json`, never guessed from the folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prismatic.data.rlds_schema import SPLIT, shard_file_name

DOCS_HINT = "see docs/DATASETS.md for how to download modified_libero_rlds and the expected layout"

# folder name -> TFDS name stored in dataset_info.json of the published data
LIBERO_DATASETS: dict[str, str] = {
    "libero_spatial_no_noops": "libero_spatial",
    "libero_object_no_noops": "libero_object",
    "libero_goal_no_noops": "libero_goal",
    "libero_10_no_noops": "liber_o10",
}
MIXTURES: dict[str, tuple[tuple[str, float], ...]] = {
    "libero_4_task_suites_no_noops": tuple((name, 1.0) for name in LIBERO_DATASETS),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder, its metadata or one of its shards is missing."""


@dataclass(frozen=True)
class DatasetLayout:
    """A resolved dataset folder: its name, TFDS name and the ordered shard files of the train split."""

    name: str
    tfds_name: str
    directory: Path
    shard_files: tuple[Path, ...]
    shard_lengths: tuple[int, ...]


def _expected_layout(root: Path, name: str, tfds_name: str | None) -> str:
    shard = shard_file_name(tfds_name or "<tfds_name>", 0, 1).replace("00001", "MMMMM").replace("00000", "NNNNN")
    return (f"expected {root}/{name}/1.0.0/ containing dataset_info.json, features.json and {shard} shards; "
            f"{DOCS_HINT}")


def resolve_dataset(data_root_dir: str | Path, name: str, version: str | None = None) -> DatasetLayout:
    """Find `{data_root_dir}/{name}/{version}/`, read its dataset_info.json and check that every shard exists."""
    root = Path(data_root_dir)
    known_tfds = LIBERO_DATASETS.get(name)
    folder = root / name
    if not folder.is_dir():
        if known_tfds is None:
            present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            raise DatasetNotFoundError(
                f"unknown dataset '{name}': not a known LIBERO dataset ({', '.join(LIBERO_DATASETS)}), not a "
                f"registered mixture ({', '.join(MIXTURES)}) and no folder {folder} exists "
                f"(folders under {root}: {present or 'none'}); {_expected_layout(root, name, None)}")
        raise DatasetNotFoundError(f"dataset folder {folder} not found; {_expected_layout(root, name, known_tfds)}")
    if version is None:
        versions = sorted((p for p in folder.iterdir() if p.is_dir() and (p / "dataset_info.json").is_file()),
                          key=lambda p: tuple(int(x) if x.isdigit() else 0 for x in p.name.split(".")))
        if not versions:
            raise DatasetNotFoundError(
                f"{folder} has no version folder with a dataset_info.json; {_expected_layout(root, name, known_tfds)}")
        directory = versions[-1]
    else:
        directory = folder / version
    info_path = directory / "dataset_info.json"
    if not info_path.is_file():
        raise DatasetNotFoundError(f"{info_path} not found; {_expected_layout(root, name, known_tfds)}")
    try:
        info = json.loads(info_path.read_text())
        tfds_name = str(info["name"])
        split = next(s for s in info["splits"] if s["name"] == SPLIT)
        shard_lengths = tuple(int(n) for n in split.get("shardLengths", []))
    except (json.JSONDecodeError, KeyError, StopIteration, TypeError, ValueError) as err:
        raise DatasetNotFoundError(f"{info_path} is not a valid TFDS dataset_info.json with a '{SPLIT}' split "
                                   f"({type(err).__name__}: {err}); {DOCS_HINT}") from err
    if not shard_lengths:
        raise DatasetNotFoundError(f"{info_path} lists no shards for the '{SPLIT}' split; {DOCS_HINT}")
    files = tuple(directory / shard_file_name(tfds_name, i, len(shard_lengths)) for i in range(len(shard_lengths)))
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise DatasetNotFoundError(f"{directory} is missing {len(missing)} of {len(files)} shards (first: "
                                   f"{missing[0]}); {_expected_layout(root, name, tfds_name)}")
    return DatasetLayout(name=name, tfds_name=tfds_name, directory=directory, shard_files=files,
                         shard_lengths=shard_lengths)


DatasetSpec = str | Sequence[tuple[str, float]] | Mapping[str, float]


def parse_dataset_spec(spec: DatasetSpec) -> list[tuple[str, float]]:
    """Normalise a dataset spec to [(name, weight), ...].

    Accepted: a dataset name, a registered mixture name, "name_a:0.7,name_b:0.3", a list of (name, weight) pairs or a
    {name: weight} mapping. Weights are relative sampling weights and must be positive.
    """
    if isinstance(spec, str):
        if spec in MIXTURES:
            pairs = list(MIXTURES[spec])
        elif "," in spec or ":" in spec:
            pairs = []
            for part in spec.split(","):
                name, _, weight = part.strip().partition(":")
                try:
                    pairs.append((name.strip(), float(weight) if weight else 1.0))
                except ValueError as err:
                    raise ValueError(f"bad weight '{weight}' for dataset '{name}' in mixture spec '{spec}'") from err
        else:
            pairs = [(spec, 1.0)]
    elif isinstance(spec, Mapping):
        pairs = [(str(k), float(v)) for k, v in spec.items()]
    else:
        pairs = [(str(n), float(w)) for n, w in spec]
    if not pairs:
        raise ValueError("empty dataset spec: give a dataset name or a list of (name, weight)")
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names) or any(not n for n in names):
        raise ValueError(f"dataset names in a mixture must be unique and non-empty, got {names}")
    bad = [(n, w) for n, w in pairs if not w > 0]
    if bad:
        raise ValueError(f"mixture weights must be > 0, got {bad}")
    return pairs
