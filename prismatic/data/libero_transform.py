"""The LIBERO step transform and chunking rule (upstream's `libero_dataset_transform` + action chunking).

Raw LIBERO gripper actions are -1 (open) / +1 (close); the policy predicts 1 = open, 0 = close, hence
`1 - clip(a, 0, 1)`. Proprio is the 8-dim state (EEF position, axis-angle, 2 gripper joint positions).
"""

from __future__ import annotations

import numpy as np

NUM_ACTIONS_CHUNK = 8
ACTION_DIM = 7
PROPRIO_DIM = 8
ACTION_NORM_MASK = (True, True, True, True, True, True, False)  # the gripper is already in [0, 1]
PROPRIO_NORM_MASK = (True,) * PROPRIO_DIM


def transform_actions(raw_actions: np.ndarray) -> np.ndarray:
    """(..., 7) raw LIBERO actions -> policy actions: dims 0-5 unchanged, gripper `1 - clip(a, 0, 1)`."""
    raw = np.asarray(raw_actions, dtype=np.float32)
    if raw.shape[-1] != ACTION_DIM:
        raise ValueError(f"LIBERO actions have {ACTION_DIM} dims, got shape {raw.shape}")
    out = raw.copy()
    out[..., 6] = 1.0 - np.clip(raw[..., 6], 0.0, 1.0)
    return out


def transform_proprio(states: np.ndarray) -> np.ndarray:
    """(..., 8) LIBERO `observation/state` -> proprio (the state itself)."""
    states = np.asarray(states, dtype=np.float32)
    if states.shape[-1] != PROPRIO_DIM:
        raise ValueError(f"LIBERO state has {PROPRIO_DIM} dims, got shape {states.shape}")
    return states


def num_chunk_frames(episode_length: int, chunk_size: int = NUM_ACTIONS_CHUNK) -> int:
    """Frames an episode contributes: its last `chunk_size - 1` frames are dropped (0 if shorter than a chunk)."""
    return max(0, episode_length - (chunk_size - 1))


def chunk_indices(step: int, episode_length: int, chunk_size: int = NUM_ACTIONS_CHUNK) -> np.ndarray:
    """Steps whose actions form the chunk of frame `step`: step..step+chunk_size-1, clamped to the last step."""
    return np.minimum(np.arange(step, step + chunk_size), episode_length - 1)
