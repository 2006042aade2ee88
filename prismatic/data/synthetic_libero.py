"""A small synthetic dataset in the LIBERO RLDS schema whose actions a policy can learn from image + instruction.

Scene: a coloured square on a grey table seen from above (third-person camera); the wrist camera sees a close-up
whose tint is the block colour and whose brightness falls with the distance to the goal. The task (instruction)
names a goal region; the action pushes the block toward it:
  action[0:2] = clip(gain * (goal - pos), -1, 1)       (gain: 2.0 normally, 4.0 for "quickly" tasks)
  action[2]   = 0.2 * (colour_index - 2)               (read from the image)
  action[3:5] = 0.1 * (goal - pos)[::-1], action[5] = 0.05 * (colour_index % 2 * 2 - 1)
  action[6]   = +1 (close) once the block is within 0.08 of the goal, else -1 (open)  (raw LIBERO convention)
so the same image calls for different actions under different instructions. With `action_reads_colour=False`
action[2] = action[5] = 0: the task no longer needs the block colour (the demo fine-tunes on such tasks, so that
a probe reading the colour of pre-training scenes measures what fine-tuning is free to overwrite). The state keeps
0.1 * colour_index in state[2] either way (the probe's label).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prismatic.data.rlds_schema import IMAGE_SHAPE
from prismatic.data.rlds_writer import write_rlds_dataset

PLACES = {
    "top left corner": (0.2, 0.2), "top right corner": (0.2, 0.8), "bottom left corner": (0.8, 0.2),
    "bottom right corner": (0.8, 0.8), "center": (0.5, 0.5), "top edge": (0.15, 0.5),
    "bottom edge": (0.85, 0.5), "left edge": (0.5, 0.15),
}
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 70, 220), "yellow": (230, 210, 40),
           "purple": (150, 60, 190)}
BLOCK_FRACTION = 0.16  # side of the square, as a fraction of the image
GRIP_DISTANCE = 0.08


def synthetic_tasks(num_tasks: int) -> list[tuple[str, tuple[float, float], float]]:
    """(instruction, goal (row, col) in [0,1], gain) of the first `num_tasks` tasks."""
    places = list(PLACES.items())
    if not 1 <= num_tasks <= 2 * len(places):
        raise ValueError(f"num_tasks must be in [1, {2 * len(places)}], got {num_tasks}")
    tasks = []
    for k in range(num_tasks):
        place, goal = places[k % len(places)]
        quick = k >= len(places)
        verb = "quickly push" if quick else "push"
        tasks.append((f"{verb} the block to the {place} of the table", goal, 4.0 if quick else 2.0))
    return tasks


def render_scene(pos: np.ndarray, colour: tuple[int, int, int], size: int = IMAGE_SHAPE[0]) -> np.ndarray:
    """Third-person view: grey table with a light border and the coloured block centred at `pos` (row, col)."""
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    image[: size // 32] = image[-size // 32:] = 200
    half = int(BLOCK_FRACTION * size / 2)
    r, c = (np.clip(pos, 0.0, 1.0) * (size - 1)).astype(int)
    image[max(0, r - half): r + half, max(0, c - half): c + half] = colour
    return image


def render_wrist(pos: np.ndarray, goal: np.ndarray, colour: tuple[int, int, int],
                 size: int = IMAGE_SHAPE[0]) -> np.ndarray:
    """Wrist view: block-coloured background, brighter as the block nears the goal, with a vertical gradient."""
    closeness = float(np.clip(1.0 - np.linalg.norm(goal - pos), 0.2, 1.0))
    ramp = np.linspace(0.6, 1.0, size, dtype=np.float32)[:, None, None]
    image = np.asarray(colour, dtype=np.float32)[None, None, :] * closeness * ramp
    return np.broadcast_to(image, (size, size, 3)).round().clip(0, 255).astype(np.uint8)


def synthetic_episode(task: tuple[str, tuple[float, float], float], steps: int, rng: np.random.Generator,
                      size: int = IMAGE_SHAPE[0], action_reads_colour: bool = True) -> dict[str, Any]:
    """One episode of `steps` steps for `task` (see module docstring for the action rule)."""
    instruction, goal_t, gain = task
    goal = np.asarray(goal_t, dtype=np.float64)
    colour_index = int(rng.integers(len(COLOURS)))
    colour = list(COLOURS.values())[colour_index]
    pos = rng.uniform(0.15, 0.85, size=2)
    images, wrists, states, joints, actions = [], [], [], [], []
    for _ in range(steps):
        delta = goal - pos
        gripper_close = np.linalg.norm(delta) < GRIP_DISTANCE
        action = np.empty(7, dtype=np.float32)
        action[0:2] = np.clip(gain * delta, -1.0, 1.0)
        action[2] = 0.2 * (colour_index - 2) if action_reads_colour else 0.0
        action[3:5] = 0.1 * delta[::-1]
        action[5] = 0.05 * (colour_index % 2 * 2 - 1) if action_reads_colour else 0.0
        action[6] = 1.0 if gripper_close else -1.0
        finger = 0.0 if gripper_close else 0.04
        images.append(render_scene(pos, colour, size))
        wrists.append(render_wrist(pos, goal, colour, size))
        states.append([pos[0], pos[1], 0.1 * colour_index, 0.0, 0.0, 0.0, finger, -finger])
        joints.append(np.concatenate([pos, delta, [finger, -finger, 0.1 * colour_index]]))
        actions.append(action)
        pos = np.clip(pos + 0.08 * action[0:2] + rng.normal(0.0, 0.005, size=2), 0.0, 1.0)
    return {"image": np.stack(images), "wrist_image": np.stack(wrists),
            "state": np.asarray(states, dtype=np.float32), "joint_state": np.asarray(joints, dtype=np.float32),
            "action": np.stack(actions), "language_instruction": instruction}


def make_synthetic_libero_dataset(data_root_dir: str | Path, dataset_name: str = "synthetic_libero_no_noops",
                                  num_tasks: int = 2, episodes_per_task: int = 3, steps: int = 20, seed: int = 0,
                                  tfds_name: str | None = None, num_shards: int = 1, overwrite: bool = False,
                                  step_jitter: int = 0, task_indices: Sequence[int] | None = None,
                                  action_reads_colour: bool = True) -> Path:
    """Write a synthetic LIBERO-like RLDS dataset; returns its version folder.

    Episodes are ordered task by task; `step_jitter` > 0 varies episode lengths in [steps - jitter, steps + jitter].
    `task_indices` picks tasks out of `synthetic_tasks(16)` (default: the first `num_tasks`), so two datasets can
    hold disjoint task sets (e.g. a pre-training set and a fine-tuning set).
    """
    if episodes_per_task < 1 or steps < 1:
        raise ValueError(f"episodes_per_task and steps must be >= 1, got {episodes_per_task}, {steps}")
    rng = np.random.default_rng(seed)
    episodes = []
    all_tasks = synthetic_tasks(2 * len(PLACES))
    if task_indices is None:
        tasks = synthetic_tasks(num_tasks)
    else:
        bad = [i for i in task_indices if not 0 <= i < len(all_tasks)]
        if bad or not task_indices:
            raise ValueError(f"task_indices must be a non-empty list of ints in [0, {len(all_tasks)}), "
                             f"got {task_indices}")
        tasks = [all_tasks[i] for i in task_indices]
    for task in tasks:
        for _ in range(episodes_per_task):
            length = steps + (int(rng.integers(-step_jitter, step_jitter + 1)) if step_jitter else 0)
            episode = synthetic_episode(task, max(1, length), rng, action_reads_colour=action_reads_colour)
            episode["file_path"] = f"synthetic/{dataset_name}/episode_{len(episodes):06d}.hdf5"
            episodes.append(episode)
    return write_rlds_dataset(data_root_dir, dataset_name, episodes, tfds_name=tfds_name,
                              num_shards=min(num_shards, len(episodes)), overwrite=overwrite)
