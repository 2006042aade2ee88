"""Few-shot truncation: keep N demonstrations per task (task = language instruction), chosen by seed.

Each task draws from its own generator seeded by (seed, crc32(task)), so the choice for a task does not depend on
which other tasks exist. Tasks with fewer than N episodes keep all of them (reported in the saved file).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

FEW_SHOT_FILE = "few_shot_episodes.json"


class EmptySelectionError(ValueError):
    """A few-shot request that selects no episode."""


def select_few_shot_episodes(episode_tasks: Mapping[int, str], num_demos_per_task: int, seed: int
                             ) -> dict[str, list[int]]:
    """{task: sorted episode ids} with min(N, available) episodes per task, drawn by seed."""
    if not isinstance(num_demos_per_task, (int, np.integer)) or num_demos_per_task < 1:
        raise EmptySelectionError(f"num_demos_per_task must be an integer >= 1, got {num_demos_per_task!r} "
                                  "(a few-shot run needs at least one demonstration per task)")
    if not episode_tasks:
        raise EmptySelectionError("few-shot selection over zero episodes (empty dataset or split)")
    by_task: dict[str, list[int]] = {}
    for episode, task in sorted(episode_tasks.items()):
        by_task.setdefault(task, []).append(int(episode))
    selection = {}
    for task in sorted(by_task):
        rng = np.random.default_rng([int(seed), zlib.crc32(task.encode("utf-8"))])
        episodes = by_task[task]
        chosen = rng.permutation(len(episodes))[:num_demos_per_task]
        selection[task] = sorted(episodes[i] for i in chosen)
    return selection


def write_few_shot_episodes(run_dir: str | Path, selection: Mapping[str, Mapping[str, Sequence[int]]],
                            num_demos_per_task: int, seed: int,
                            available: Mapping[str, Mapping[str, int]] | None = None) -> Path:
    """Write `{run_dir}/few_shot_episodes.json`: {"num_demos_per_task", "seed", "datasets": {name: {task: ids}}}."""
    total = sum(len(ids) for tasks in selection.values() for ids in tasks.values())
    if total == 0:
        raise EmptySelectionError("refusing to write an empty few-shot selection")
    record = {"num_demos_per_task": int(num_demos_per_task), "seed": int(seed),
              "datasets": {name: {task: [int(i) for i in ids] for task, ids in tasks.items()}
                           for name, tasks in selection.items()}}
    if available is not None:
        record["episodes_available_per_task"] = {n: dict(t) for n, t in available.items()}
    path = Path(run_dir) / FEW_SHOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)
    return path
