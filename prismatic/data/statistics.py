"""Dataset statistics for BOUNDS_Q99 normalisation, in upstream's `dataset_statistics.json` format.

{dataset_name: {"action": {mean, std, max, min, q01, q99, mask}, "proprio": {...}, "num_transitions",
"num_trajectories"}}, computed over every transition of the dataset's episodes (after the LIBERO transform),
whatever split or few-shot selection a run then uses, so runs on the same files share one normalisation. Results are
cached under `{cache_dir}/{content_hash}.json`; the hash covers the shard bytes, so edited data is never served stale.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prismatic.data.libero_transform import ACTION_NORM_MASK, PROPRIO_NORM_MASK, transform_actions, transform_proprio
from prismatic.data.rlds_episodes import EpisodeTable

STATISTICS_FILE = "dataset_statistics.json"
_CACHE_FORMAT = 1


def array_statistics(x: np.ndarray, mask: Sequence[bool]) -> dict[str, list]:
    """mean/std/max/min/q01/q99 over axis 0 of (N, D) data, plus the normalisation mask."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"statistics need a non-empty (N, D) array, got shape {x.shape}")
    if len(mask) != x.shape[1]:
        raise ValueError(f"mask has {len(mask)} entries for {x.shape[1]} dims")
    return {"mean": x.mean(0).tolist(), "std": x.std(0).tolist(), "max": x.max(0).tolist(),
            "min": x.min(0).tolist(), "q01": np.quantile(x, 0.01, axis=0).tolist(),
            "q99": np.quantile(x, 0.99, axis=0).tolist(), "mask": [bool(m) for m in mask]}


def _check_finite(table: EpisodeTable, values: np.ndarray, what: str) -> None:
    """ValueError naming the first episode and step holding NaN / inf (the statistics would be NaN)."""
    bad = ~np.isfinite(values)
    if bad.any():
        row, dim = (int(i) for i in np.argwhere(bad)[0])
        episode = int(np.searchsorted(table.episode_starts, row, side="right") - 1)
        path = table.file_paths[episode] if episode < len(table.file_paths) else ""
        raise ValueError(f"dataset '{table.name}': {what} of episode {episode} ({path or 'no file path'}) is not "
                         f"finite at step {row - int(table.episode_starts[episode])}, dimension {dim} "
                         f"({int(bad.sum())} non-finite values in the dataset); statistics need finite data")


def compute_statistics(table: EpisodeTable) -> dict[str, Any]:
    """Statistics entry of one dataset (all transitions, LIBERO transform applied); refuses NaN / inf."""
    _check_finite(table, table.actions, "the action")
    _check_finite(table, table.states, "the proprio state")
    return {"action": array_statistics(transform_actions(table.actions), ACTION_NORM_MASK),
            "proprio": array_statistics(transform_proprio(table.states), PROPRIO_NORM_MASK),
            "num_transitions": int(table.num_steps), "num_trajectories": int(table.num_episodes)}


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def cached_statistics(table: EpisodeTable, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """`compute_statistics`, read from / written to `{cache_dir}/{content_hash}.json` when a cache dir is given."""
    if cache_dir is None:
        return compute_statistics(table)
    path = Path(cache_dir) / f"{table.content_hash}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            if cached.get("format") == _CACHE_FORMAT and statistics_are_finite(cached["statistics"]):
                return cached["statistics"]
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            pass  # unreadable cache entry: recompute and overwrite it
    stats = compute_statistics(table)
    _atomic_write_json(path, {"format": _CACHE_FORMAT, "dataset": table.name, "statistics": stats})
    return stats


def statistics_are_finite(entry: Mapping[str, Any]) -> bool:
    """True when every number of a statistics entry (action / proprio mean, std, ..., q99) is finite."""
    numbers = [v for part in ("action", "proprio") for key, values in entry.get(part, {}).items() if key != "mask"
               for v in (values if isinstance(values, list) else [values])]
    return all(isinstance(v, (int, float)) and np.isfinite(v) for v in numbers)


def save_dataset_statistics(statistics: Mapping[str, Any], run_dir: str | Path) -> Path:
    """Write `{run_dir}/dataset_statistics.json` (upstream format, keyed by dataset name)."""
    path = Path(run_dir) / STATISTICS_FILE
    _atomic_write_json(path, dict(statistics))
    return path


def load_dataset_statistics(path: str | Path) -> dict[str, Any]:
    """Read a `dataset_statistics.json` file (or the one inside a directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / STATISTICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no dataset statistics at {path}")
    stats = json.loads(path.read_text())
    for name, entry in stats.items():
        for part in ("action", "proprio"):
            missing = [k for k in ("q01", "q99") if k not in entry.get(part, {})]
            if missing:
                raise KeyError(f"{path}: '{name}/{part}' lacks {missing}")
    return stats
