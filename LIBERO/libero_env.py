"""Simulator side of the evaluation: one LIBERO environment driven episode by episode.

`EpisodeRunner` is a small state machine owned by one simulator worker. `start(spec)` builds (or reuses) the
task's environment, loads the fixed init state of the trial, lets objects settle for `num_settle_steps` no-op steps
and returns the first policy request; `act(chunk)` executes a chunk of simulator actions open-loop and returns
either the next request or the finished episode's record. Success is the environment's own verdict
(`done` from `step`, i.e. `check_success()` in LIBERO), read again with `check_success()` on the final state.

Reproducible trials. Upstream builds one env per task, seeds it once and runs trials 0..49 in order, each a hard
`reset()` then `set_init_state(init_states[k])`. Every hard reset re-draws the fixtures the init state does not
restore (stove, cabinet: up to ~1.5 cm on libero_spatial) from NumPy's global RNG, which `env.seed` seeds. So trial
k is defined as "the (k+1)-th reset of a fresh env seeded `env_seed`", and the runner enforces exactly that whatever
the scheduling: it rebuilds a fresh env when the task changes or when the env is already past trial k, and replays
the resets of skipped trials (reset without stepping; stepping does not touch that RNG). The env's RNG stream is
kept private (saved and restored around seeding and resets), so nothing else in the process shifts it.

An exception inside an episode (env or policy side) ends that episode as a failure whose record carries the
traceback under "error"; the env is discarded (its state is unknown) and rebuilt for the next trial.
"""

from __future__ import annotations

import json
import os
import time
import traceback
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
    """Write RGB uint8 frames to an H.264 mp4 (yuv420p: plays in browsers) with imageio + imageio-ffmpeg's bundled
    ffmpeg; written to a temp name first so no partial file remains."""
    import imageio.v2 as imageio

    tmp = path.with_name(path.stem + ".partial.mp4")
    # yuv420p (what browsers play) needs even sizes: macro_block_size=2 (LIBERO's frames are 256 px anyway)
    with imageio.get_writer(tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=2, ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(np.ascontiguousarray(frame, dtype=np.uint8))
    os.replace(tmp, path)


def body_positions(env) -> np.ndarray | None:
    """(nbody, 3) positions of the model's bodies: shows where the fixtures (stove, cabinet) were placed, which the
    sim state (qpos/qvel) does not contain. None for envs without a MuJoCo model (test fakes)."""
    sim = getattr(getattr(env, "env", None), "sim", None)
    return None if sim is None else np.array(sim.model.body_pos, dtype=np.float64)


class EpisodeRunner:
    """Runs episodes in one environment (re-created when the task changes, when a trial earlier than the env's
    position in its reset sequence is asked for, and after an episode raised)."""

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
        self._resets = 0  # hard resets of the current env since it was built and seeded
        self._env_rng = None  # NumPy global RNG state of the current env (fixture placement at reset)
        self.envs_built = 0
        self.replayed_resets = 0  # resets done only to reach a trial's position in the reset sequence

    # -- episode lifecycle ------------------------------------------------------------------------------------
    def start(self, spec: EpisodeSpec) -> tuple[str, dict]:
        """Begin trial `spec.trial` as the (trial+1)-th reset of a fresh env; an exception ends it as a failure."""
        self._spec = spec
        self._t0 = time.perf_counter()
        self._steps = 0
        try:
            return self._start(spec)
        except Exception:
            return "done", self._fail(traceback.format_exc())

    def _start(self, spec: EpisodeSpec) -> tuple[str, dict]:
        task = spec.task
        if self._env_task != (task.suite, task.task_id) or self._resets > spec.trial:
            self._open(task)
        if not 0 <= spec.trial < len(self._init_states):
            raise ValueError(f"trial {spec.trial} of {task.suite} task {task.task_id} has no init state "
                             f"(the task has {len(self._init_states)})")
        while self._resets < spec.trial:  # trials skipped (resume) or run elsewhere: replay their resets
            self._reset()
            self.replayed_resets += 1
        env = self._env
        self._reset()
        init_state = np.asarray(self._init_states[spec.trial])
        obs = env.set_init_state(init_state)
        for _ in range(self.settings.num_settle_steps):
            obs, _, _, _ = env.step(SETTLE_ACTION.copy())
        self._steps = 0
        self._actions: list[np.ndarray] = []
        self._proprio = [extract_proprio(obs)]
        self._frames = [rotate_180(obs[THIRD_PERSON_KEY])] if self.settings.video_dir else []
        self._init_state = init_state
        self._body_pos = body_positions(env)
        return "obs", self._request(obs)

    def act(self, actions: np.ndarray) -> tuple[str, dict]:
        """Execute `actions` (K, 7) open-loop; stop early on success or when the step budget is spent."""
        if self._spec is None:
            raise RuntimeError("act() called with no episode running; call start() first")
        try:
            return self._act(actions)
        except Exception:
            return "done", self._fail(traceback.format_exc())

    def abort(self, error: str) -> tuple[str, dict]:
        """End the running episode as a failure because of `error` (e.g. the policy raised on its observation)."""
        if self._spec is None:
            raise RuntimeError("abort() called with no episode running")
        return "done", self._fail(error, discard_env=False)

    def _act(self, actions: np.ndarray) -> tuple[str, dict]:
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
        env, self._env, self._env_task, self._init_states, self._resets = self._env, None, None, None, 0
        if env is not None:
            env.close()

    # -- internals --------------------------------------------------------------------------------------------
    def _open(self, task: TaskSpec) -> None:
        """A fresh env for `task`, seeded by the factory; its RNG stream is captured and kept apart."""
        self.close()
        outer = np.random.get_state()
        try:
            self._env = self._env_factory(task, self.settings)
            self._env_rng = np.random.get_state()
        finally:
            np.random.set_state(outer)
        self._init_states = np.asarray(self._init_states_loader(task))
        self._env_task = (task.suite, task.task_id)
        self._resets = 0
        self.envs_built += 1

    def _reset(self) -> None:
        outer = np.random.get_state()
        np.random.set_state(self._env_rng)
        try:
            self._env.reset()
        finally:
            self._env_rng = np.random.get_state()
            np.random.set_state(outer)
        self._resets += 1

    def _record(self, success: bool) -> dict:
        spec = self._spec
        return {"suite": spec.task.suite, "task_id": spec.task.task_id, "task_name": spec.task.name,
                "instruction": spec.task.instruction, "trial": spec.trial, "success": success,
                "steps": self._steps, "max_steps": spec.max_steps,
                "seconds": round(time.perf_counter() - self._t0, 3), "video": None, "rollout": None}

    def _fail(self, error: str, discard_env: bool = True) -> dict:
        """The record of an episode that raised: a failure carrying the traceback. The env is closed when its
        state is unknown (it raised), so the next trial starts from a fresh env and replays its resets."""
        record = self._record(False)
        record["error"] = error
        self._spec = None
        self._frames, self._actions = [], []
        if discard_env:
            try:
                self.close()  # forgets the env first, then closes it
            except Exception:  # a broken env may fail to close; it is dropped either way
                pass
        return record

    def _request(self, obs: dict) -> dict:
        spec = self._spec
        return {"key": spec.key, "instruction": spec.task.instruction, "proprio": extract_proprio(obs),
                "images": policy_images(obs, self.settings.num_images), "steps": self._steps}

    def _finish(self) -> dict:
        spec, env = self._spec, self._env
        success = bool(env.check_success())  # the env's verdict on the final state
        record = self._record(success)
        record["env_resets"] = self._resets  # hard resets of this env so far, this trial's included (= trial + 1)
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
                     final_state=np.asarray(env.get_sim_state()), spec=json.dumps(asdict(spec)),
                     body_pos=self._body_pos if self._body_pos is not None else np.zeros((0, 3)),
                     env_resets=self._resets)
            os.replace(tmp, path)
            record["rollout"] = str(path)
        self._spec = None
        self._frames, self._actions = [], []
        return record
