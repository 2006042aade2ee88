"""Policy action chunk -> simulator actions.

`predict_action` returns a chunk (8, 7) already un-normalised on dims 0-5 (BOUNDS_Q99 with the checkpoint's
q01/q99). The gripper dim 6 is NOT normalised: it is the model's output in the training convention
`g = 1 - clip(a_raw, 0, 1)`, i.e. ~1 = open, ~0 = closed. The simulator (robosuite Panda) wants -1 = open,
+1 = close. Upstream's evaluation rescales [0, 1] -> [-1, 1], takes the sign and flips it (`normalize_gripper_action`
then `invert_gripper_action`), and so does this module, to the bit:

    g > 0.5   ->  -1 (open)
    g < 0.5   ->  +1 (close)
    g == 0.5  ->  -0.0 (sign 0, flipped: the gripper is commanded neither way, as upstream)
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
    """Model gripper output (1 = open, 0 = close) -> simulator command (-1 = open, +1 = close, -0.0 at exactly 0.5),
    upstream's `-sign(2 g - 1)` in float64."""
    g = np.asarray(gripper, dtype=np.float64)
    return np.sign(2.0 * g - 1.0) * -1.0


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
