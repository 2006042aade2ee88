"""Policy action chunk -> simulator actions.

`predict_action` returns a chunk (8, 7) already un-normalised on dims 0-5 (BOUNDS_Q99 with the checkpoint's
q01/q99). The gripper dim 6 is NOT normalised: it is the model's output in the training convention
`g = 1 - clip(a_raw, 0, 1)`, i.e. ~1 = open, ~0 = closed. The simulator (robosuite Panda) wants -1 = open,
+1 = close, so:

    g >= 0.5  ->  -1 (open)
    g <  0.5  ->  +1 (close)

which is upstream's "rescale [0, 1] -> [-1, 1], take the sign, then flip the sign" with the tie (g = 0.5, where
the sign would be 0) sent to "open" so the command is always +-1.
"""

from __future__ import annotations

import numpy as np

ACTION_DIM = 7
GRIPPER_DIM = 6
GRIPPER_OPEN = -1.0
GRIPPER_CLOSE = 1.0
# Action used while objects settle after the init state is loaded: no motion, gripper open.
SETTLE_ACTION = np.array([0.0] * 6 + [GRIPPER_OPEN], dtype=np.float64)


def gripper_to_env(gripper: np.ndarray) -> np.ndarray:
    """Model gripper output (1 = open, 0 = close) -> simulator command (-1 = open, +1 = close), binarised."""
    g = np.asarray(gripper, dtype=np.float64)
    return np.where(g >= 0.5, GRIPPER_OPEN, GRIPPER_CLOSE)


def chunk_to_env_actions(chunk: np.ndarray) -> np.ndarray:
    """(K, 7) un-normalised policy chunk -> (K, 7) float64 simulator actions (arm dims as is, gripper +-1)."""
    chunk = np.asarray(chunk, dtype=np.float64)
    if chunk.ndim != 2 or chunk.shape[1] != ACTION_DIM:
        raise ValueError(f"expected an action chunk of shape (K, {ACTION_DIM}), got {chunk.shape}")
    if not np.all(np.isfinite(chunk)):
        raise ValueError("action chunk contains NaN or inf")
    out = chunk.copy()
    out[:, GRIPPER_DIM] = gripper_to_env(chunk[:, GRIPPER_DIM])
    return out
