"""Test helpers of the LIBERO evaluation: a spy / stand-in policy, a scripted fake environment, the skip mark."""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest

HAS_LIBERO = find_spec("libero") is not None and find_spec("robosuite") is not None
needs_libero = pytest.mark.skipif(not HAS_LIBERO, reason="needs the `libero` extra (pip install -e .[libero])")


class SpyPolicy:
    """Wraps a policy and records every predict_action call (instruction, proprio, images, output)."""

    def __init__(self, policy):
        self.policy = policy
        self.norm_stats = policy.norm_stats
        self.policy_config = getattr(policy, "policy_config", None)
        self.processor = getattr(policy, "processor", None)
        self.calls: list[dict] = []

    def predict_action(self, images, instruction, proprio=None, unnorm_key=None, center_crop=False):
        out = self.policy.predict_action(images=images, instruction=instruction, proprio=proprio,
                                         unnorm_key=unnorm_key, center_crop=center_crop)
        self.calls.append({"instruction": instruction, "proprio": None if proprio is None else np.array(proprio),
                           "images": [np.array(im) for im in images], "unnorm_key": unnorm_key,
                           "center_crop": center_crop, "output": np.array(out)})
        return out


class ScriptedPolicy:
    """Stand-in policy returning a fixed chunk; keeps the instructions it was given."""

    def __init__(self, chunk: np.ndarray, stats_key: str = "libero_spatial_no_noops"):
        self.chunk = np.asarray(chunk, dtype=np.float32)
        self.norm_stats = {stats_key: {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7}}}
        self.instructions: list[str] = []

    def predict_action(self, images, instruction, proprio=None, unnorm_key=None, center_crop=False):
        self.instructions.append(instruction)
        return self.chunk.copy()


class FakeEnv:
    """Minimal LIBERO-like env: eef x position integrates action[0]; success once x >= `goal_x`.

    Like LIBERO, `seed` seeds NumPy's global RNG and every `reset` draws a fixture position from it (which the init
    state does not restore); `fail_on_step` makes the step with that index (counted since the last reset) raise.
    """

    def __init__(self, goal_x: float = np.inf, resolution: int = 32, seed: int | None = None,
                 fail_on_step: int | None = None):
        self.goal_x = goal_x
        self.resolution = resolution
        self.fail_on_step = fail_on_step
        self.x = 0.0
        self.actions: list[np.ndarray] = []
        self.resets = 0
        self.fixture = None
        self.fixtures: list[float] = []  # fixture drawn at each reset
        self.closed = False
        if seed is not None:
            np.random.seed(seed)

    def _obs(self) -> dict:
        img = np.zeros((self.resolution, self.resolution, 3), dtype=np.uint8)
        img[0, 0] = 255  # marks the top-left corner (moves to bottom-right after the 180 degree rotation)
        return {"agentview_image": img, "robot0_eye_in_hand_image": img[:, :, ::-1].copy(),
                "robot0_eef_pos": np.array([self.x, 0.0, 0.0]), "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
                "robot0_gripper_qpos": np.array([0.04, -0.04])}

    def reset(self):
        self.resets += 1
        self.x = 0.0
        self.actions = []
        self.fixture = float(np.random.uniform())
        self.fixtures.append(self.fixture)
        return self._obs()

    def set_init_state(self, state):
        self.x = float(state[0])
        return self._obs()

    def step(self, action):
        if self.fail_on_step is not None and len(self.actions) == self.fail_on_step:
            raise FloatingPointError("MuJoCo-like instability (simulated)")
        self.actions.append(np.array(action))
        self.x += float(action[0])
        return self._obs(), 0.0, self.check_success(), {}

    def check_success(self) -> bool:
        return self.x >= self.goal_x

    def get_sim_state(self) -> np.ndarray:
        return np.array([self.x])

    def close(self):
        self.closed = True
