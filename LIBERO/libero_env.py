"""Simulator side of the evaluation: one LIBERO environment driven episode by episode.

`EpisodeRunner` is a small state machine owned by one simulator worker. `start(spec)` builds (or reuses) the
task's environment, loads the fixed init state of the trial, lets objects settle for `num_settle_steps` no-op steps
and returns the first policy request; `act(chunk)` executes a chunk of simulator actions open-loop and returns
either the next request or the finished episode's record. Success is the environment's own verdict
(`done` from `step`, i.e. `check_success()` in LIBERO), read again with `check_success()` on the final state.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from LIBERO.action_processing import SETTLE_ACTION
from LIBERO.obs_processing import THIRD_PERSON_KEY, extract_proprio, policy_images, rotate_180
from LIBERO.suites import TaskSpec, _quiet_suite, require_libero

NUM_SETTLE_STEPS = 10  # upstream: wait for objects to fall and settle after loading the init state
CAMERA_RESOLUTION = 256  # LIBERO renders at 256 px; the RLDS data was made at that size too
VIDEO_FPS = 30


@dataclass(frozen=True)
class SimSettings:
    """What every simulator worker needs, identical across workers (picklable)."""

    num_images: int = 2
    camera_resolution: int = CAMERA_RESOLUTION
    env_seed: int = 0  # upstream seeds every env with 0: the seed moves objects even with fixed init states
    num_settle_steps: int = NUM_SETTLE_STEPS
    video_dir: str | None = None
    rollout_dir: str | None = None  # per-episode npz: executed actions, proprio trace, init and final sim state


@dataclass(frozen=True)
class EpisodeSpec:
    task: TaskSpec
    trial: int
    max_steps: int

    @property
    def key(self) -> str:
        return episode_key(self.task.suite, self.task.task_id, self.trial)


def episode_key(suite: str, task_id: int, trial: int) -> str:
    return f"{suite}--task{task_id:02d}--trial{trial:03d}"


def make_libero_env(task: TaskSpec, settings: SimSettings):
    """Build the headless LIBERO environment of `task` (EGL by default, OSMesa with MUJOCO_GL=osmesa)."""
    require_libero()
    from libero.libero.envs import OffScreenRenderEnv

    env = OffScreenRenderEnv(bddl_file_name=task.bddl_file, camera_heights=settings.camera_resolution,
                             camera_widths=settings.camera_resolution)
    env.seed(settings.env_seed)
    return env


def load_init_states(task: TaskSpec) -> np.ndarray:
    """The suite's fixed init states of `task` (50 per task for the LIBERO suites)."""
    benchmark = require_libero()
    return np.asarray(_quiet_suite(benchmark, task.suite).get_task_init_states(task.task_id))


def write_video(path: Path, frames: list[np.ndarray], fps: int = VIDEO_FPS) -> None:
    """Write RGB uint8 frames to an mp4 (OpenCV `mp4v`); written to a temp name first so no partial file remains."""
    import cv2

    height, width = frames[0].shape[:2]
    tmp = path.with_name(path.stem + ".partial.mp4")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open a video writer for {tmp}")
    for frame in frames:
        writer.write(cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2BGR))
    writer.release()
    os.replace(tmp, path)


class EpisodeRunner:
    """Runs episodes in one environment (re-created only when the task changes)."""

    def __init__(self, settings: SimSettings,
                 env_factory: Callable[[TaskSpec, SimSettings], object] = make_libero_env,
                 init_states_loader: Callable[[TaskSpec], np.ndarray] = load_init_states):
        self.settings = settings
        self._env_factory = env_factory
        self._init_states_loader = init_states_loader
        self._env = None
        self._env_task: tuple[str, int] | None = None
        self._init_states: np.ndarray | None = None
        self._spec: EpisodeSpec | None = None

    # -- episode lifecycle ------------------------------------------------------------------------------------
    def start(self, spec: EpisodeSpec) -> tuple[str, dict]:
        task = spec.task
        if self._env_task != (task.suite, task.task_id):
            self.close()
            self._env = self._env_factory(task, self.settings)
            self._init_states = np.asarray(self._init_states_loader(task))
            self._env_task = (task.suite, task.task_id)
        if not 0 <= spec.trial < len(self._init_states):
            raise ValueError(f"trial {spec.trial} of {task.suite} task {task.task_id} has no init state "
                             f"(the task has {len(self._init_states)})")
        self._spec = spec
        self._t0 = time.perf_counter()
        env = self._env
        env.reset()
        init_state = np.asarray(self._init_states[spec.trial])
        obs = env.set_init_state(init_state)
        for _ in range(self.settings.num_settle_steps):
            obs, _, _, _ = env.step(SETTLE_ACTION.copy())
        self._steps = 0
        self._actions: list[np.ndarray] = []
        self._proprio = [extract_proprio(obs)]
        self._frames = [rotate_180(obs[THIRD_PERSON_KEY])] if self.settings.video_dir else []
        self._init_state = init_state
        return "obs", self._request(obs)

    def act(self, actions: np.ndarray) -> tuple[str, dict]:
        """Execute `actions` (K, 7) open-loop; stop early on success or when the step budget is spent."""
        if self._spec is None:
            raise RuntimeError("act() called with no episode running; call start() first")
        actions = np.asarray(actions, dtype=np.float64)
        done = False
        obs = None
        for action in actions:
            if self._steps >= self._spec.max_steps:
                break
            obs, _, done, _ = self._env.step(action.copy())
            self._steps += 1
            self._actions.append(action)
            self._proprio.append(extract_proprio(obs))
            if self.settings.video_dir:
                self._frames.append(rotate_180(obs[THIRD_PERSON_KEY]))
            if done:
                break
        if done or self._steps >= self._spec.max_steps:
            return "done", self._finish()
        return "obs", self._request(obs)

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
        self._env, self._env_task, self._init_states = None, None, None

    # -- internals --------------------------------------------------------------------------------------------
    def _request(self, obs: dict) -> dict:
        spec = self._spec
        return {"key": spec.key, "instruction": spec.task.instruction, "proprio": extract_proprio(obs),
                "images": policy_images(obs, self.settings.num_images), "steps": self._steps}

    def _finish(self) -> dict:
        spec, env = self._spec, self._env
        success = bool(env.check_success())  # the env's verdict on the final state
        record = {"suite": spec.task.suite, "task_id": spec.task.task_id, "task_name": spec.task.name,
                  "instruction": spec.task.instruction, "trial": spec.trial, "success": success,
                  "steps": self._steps, "max_steps": spec.max_steps,
                  "seconds": round(time.perf_counter() - self._t0, 3), "video": None, "rollout": None}
        tag = f"{spec.key}--{'success' if success else 'failure'}"
        if self.settings.video_dir and self._frames:
            path = Path(self.settings.video_dir) / f"{tag}.mp4"
            write_video(path, self._frames)
            record["video"] = str(path)
        if self.settings.rollout_dir:
            path = Path(self.settings.rollout_dir) / f"{spec.key}.npz"
            tmp = path.with_name(path.stem + ".partial.npz")
            np.savez(tmp, actions=np.asarray(self._actions, dtype=np.float64).reshape(-1, 7),
                     proprio=np.asarray(self._proprio, dtype=np.float32), init_state=self._init_state,
                     final_state=np.asarray(env.get_sim_state()), spec=json.dumps(asdict(spec)))
            os.replace(tmp, path)
            record["rollout"] = str(path)
        self._spec = None
        self._frames, self._actions = [], []
        return record
