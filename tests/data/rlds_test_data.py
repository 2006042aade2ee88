"""Raw synthetic episodes kept in memory by the data tests as their independent ground truth."""

from __future__ import annotations

import numpy as np

from prismatic.data.synthetic_libero import synthetic_episode, synthetic_tasks


def make_episodes(num_tasks: int, episodes_per_task: int, lengths: list[int] | None, seed: int) -> list[dict]:
    """Raw episodes (kept in memory by the tests as the independent ground truth)."""
    rng = np.random.default_rng(seed)
    episodes = []
    for task in synthetic_tasks(num_tasks):
        for _ in range(episodes_per_task):
            steps = lengths[len(episodes) % len(lengths)] if lengths else 12
            episodes.append(synthetic_episode(task, steps, rng))
    for i, ep in enumerate(episodes):
        ep["file_path"] = f"ep_{i}.hdf5"
    return episodes
