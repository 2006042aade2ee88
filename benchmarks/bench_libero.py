"""LIBERO evaluation throughput on this machine: simulator steps/s, policy calls/s, closed-loop scaling.

    python benchmarks/bench_libero.py                      # tiny policy, libero_spatial task 0
    python benchmarks/bench_libero.py --pretrained_checkpoint <folder> --num_envs_list "[1, 2, 4]"

Prints one line per measurement. The closed-loop part runs `run_evaluation` on short episodes
(`episode_steps` policy steps + 10 settle steps each) with each `num_envs` value.
"""


import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from prismatic.cli_errors import cli_entry, parse_config  # noqa: E402 - after the sys.path line


@dataclass
class BenchConfig:
    task_suite_name: str = "libero_spatial"
    task_id: int = 0
    sim_steps: int = 40  # steps timed per simulator measurement
    policy_calls: int = 20
    pretrained_checkpoint: str = ""  # default: a randomly initialised tiny policy
    num_envs_list: list[int] = field(default_factory=lambda: [1, 2])
    closed_loop_episodes: int = 4
    episode_steps: int = 24  # policy steps per closed-loop episode (3 chunks)
    batch_size: int = 4  # envs answered together in the batched-policy measurement


def tiny_policy():
    """Randomly initialised tiny policy (test sizes) with synthetic statistics."""
    import torch

    from prismatic.models.configuration_vla import make_vla_config
    from prismatic.models.modeling_vla import OpenVLAForActionPrediction
    from prismatic.models.policy import PolicyConfig, VLAPolicy
    from prismatic.models.processing_vla import PrismaticProcessor
    from prismatic.models.tokenizer_tiny import train_tiny_tokenizer

    torch.manual_seed(0)
    vla = OpenVLAForActionPrediction(make_vla_config("tiny")).eval()
    stats = {"libero_spatial_no_noops": {
        "action": {"q01": [-0.5] * 7, "q99": [0.5] * 7, "mask": [True] * 6 + [False]},
        "proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8}}}
    processor = PrismaticProcessor(train_tiny_tokenizer(), num_images=2)
    return VLAPolicy.from_vla(vla, processor, stats, PolicyConfig()).eval()


def bench_simulator(cfg: BenchConfig) -> None:
    from LIBERO.action_processing import SETTLE_ACTION
    from LIBERO.libero_env import SimSettings, load_init_states, make_libero_env
    from LIBERO.suites import load_suite_tasks

    task = load_suite_tasks(cfg.task_suite_name)[cfg.task_id]
    t0 = time.perf_counter()
    env = make_libero_env(task, SimSettings())
    t1 = time.perf_counter()
    env.reset()
    t2 = time.perf_counter()
    env.set_init_state(load_init_states(task)[0])
    env.step(SETTLE_ACTION.copy())  # first step compiles / warms up
    t3 = time.perf_counter()
    for _ in range(cfg.sim_steps):
        env.step(SETTLE_ACTION.copy())
    t4 = time.perf_counter()
    env.close()
    print(f"env build {t1 - t0:.2f} s | reset {t2 - t1:.2f} s | first step {t3 - t2:.2f} s")
    print(f"simulator (2 cameras 256 px, EGL): {cfg.sim_steps / (t4 - t3):.2f} steps/s "
          f"({1000 * (t4 - t3) / cfg.sim_steps:.0f} ms/step)")

    from libero.libero.envs.env_wrapper import ControlEnv
    env = ControlEnv(bddl_file_name=task.bddl_file, has_offscreen_renderer=False, use_camera_obs=False)
    env.seed(0)
    env.reset()
    env.set_init_state(load_init_states(task)[0])
    t0 = time.perf_counter()
    for _ in range(cfg.sim_steps):
        env.step(SETTLE_ACTION.copy())
    dt = time.perf_counter() - t0
    env.close()
    print(f"simulator physics only (no rendering): {cfg.sim_steps / dt:.2f} steps/s "
          f"({1000 * dt / cfg.sim_steps:.0f} ms/step)")


def bench_policy(cfg: BenchConfig, policy) -> None:
    from LIBERO.obs_processing import policy_images
    from LIBERO.policy_runner import PolicyRunner, policy_statistics_keys, resolve_unnorm_key

    rng = np.random.default_rng(0)
    # Raw 256 px camera frames through the evaluation's image path (rotate, JPEG round trip, lanczos3 to 224).
    obs = {key: rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
           for key in ("agentview_image", "robot0_eye_in_hand_image")}
    policy_images(obs, 2)  # warm-up (compiles the resize kernel on a first run)
    t0 = time.perf_counter()
    for _ in range(cfg.policy_calls):
        views = policy_images(obs, 2)
    dt = time.perf_counter() - t0
    print(f"evaluation image path (2 cameras, 256 px -> 224): {1000 * dt / cfg.policy_calls:.2f} ms per observation")
    request = {"images": views,
               "instruction": "pick up the black bowl and place it on the plate",
               "proprio": rng.uniform(-0.1, 0.1, 8).astype(np.float32)}
    key = resolve_unnorm_key(policy_statistics_keys(policy), None, cfg.task_suite_name)
    runner = PolicyRunner(policy, unnorm_key=key, center_crop=True, use_proprio=True, num_images=2)
    runner([request])  # warm-up
    t0 = time.perf_counter()
    for _ in range(cfg.policy_calls):
        runner([request])
    dt = time.perf_counter() - t0
    print(f"policy ({'checkpoint' if cfg.pretrained_checkpoint else 'tiny'}): {cfg.policy_calls / dt:.2f} calls/s "
          f"({1000 * dt / cfg.policy_calls:.0f} ms/call, one chunk of 8 actions per call)")
    n = cfg.batch_size
    rounds = max(1, cfg.policy_calls // n)
    runner([request] * n)  # warm-up
    t0 = time.perf_counter()
    for _ in range(rounds):
        runner([request] * n)
    dt = time.perf_counter() - t0
    print(f"policy, {n} envs answered per batched round: {rounds * n / dt:.2f} calls/s "
          f"({1000 * dt / rounds:.0f} ms/round)")


def bench_closed_loop(cfg: BenchConfig, policy) -> None:
    from LIBERO.run_libero_eval import EvalConfig, run_evaluation

    for num_envs in cfg.num_envs_list:
        with tempfile.TemporaryDirectory() as out:
            trials = max(1, cfg.closed_loop_episodes)
            ecfg = EvalConfig(task_suite_name=cfg.task_suite_name, task_ids=[cfg.task_id],
                              num_trials_per_task=trials, max_steps_override=cfg.episode_steps, num_envs=num_envs,
                              local_log_dir=out, progress=False)
            t0 = time.perf_counter()
            summary = run_evaluation(ecfg, policy=policy)
            dt = time.perf_counter() - t0
        steps = summary["num_episodes"] * (cfg.episode_steps + 10)
        print(f"closed loop, num_envs={num_envs}: {summary['num_episodes']} episodes in {dt:.1f} s "
              f"({dt / summary['num_episodes']:.1f} s/episode incl. env build/reset, {steps / dt:.2f} sim steps/s, "
              f"{summary['policy_calls'] / dt:.2f} policy calls/s in {summary['policy_rounds']} rounds)")


@cli_entry("bench_libero")
def main(argv: list[str] | None = None) -> None:
    import torch

    cfg = parse_config(BenchConfig, argv)

    print(f"torch threads {torch.get_num_threads()}")
    if cfg.pretrained_checkpoint:
        from LIBERO.policy_runner import load_policy_checkpoint
        policy = load_policy_checkpoint(cfg.pretrained_checkpoint)
    else:
        policy = tiny_policy()
    bench_simulator(cfg)
    bench_policy(cfg, policy)
    bench_closed_loop(cfg, policy)


if __name__ == "__main__":
    main()
