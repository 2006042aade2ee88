"""Closed-loop evaluation of a VLA-Adapter policy in LIBERO / LIBERO-PRO.

    python LIBERO/run_libero_eval.py --pretrained_checkpoint runs/<run>--20000_chkpt \
        --task_suite_name libero_spatial --num_envs 4 --local_log_dir eval_logs/spatial

Protocol (upstream VLA-Adapter / OpenVLA-OFT): the suite's fixed init states (trial i uses init state i), seed 7,
10 no-op settle steps, per-suite step budgets (spatial 220, object 280, goal 300, libero_10 520), images rotated
by 180 degrees and resized to 224 (center crop when the model was trained with crop augmentation), each predicted
chunk of 8 actions executed open-loop, un-normalised with the checkpoint's q01/q99, gripper binarised to
-1 open / +1 close, success as reported by the environment. Output: {local_log_dir}/episodes.jsonl and
{local_log_dir}/summary.json (+ wandb when --use_wandb). See docs/LIBERO_EVAL.md.
"""


import os
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python LIBERO/run_libero_eval.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import draccus
import numpy as np
from tqdm import tqdm

from LIBERO.env_pool import EnvPool
from LIBERO.libero_env import NUM_SETTLE_STEPS, EpisodeSpec, SimSettings
from LIBERO.policy_runner import (
    PolicyRunner,
    load_policy_checkpoint,
    policy_statistics_keys,
    resolve_input_settings,
    resolve_unnorm_key,
)
from LIBERO.results import ResultsStore
from LIBERO.suites import TaskSpec, base_suite, load_suite_tasks, max_steps_for


@dataclass
class EvalConfig:
    # Model
    pretrained_checkpoint: str = ""  # this project's checkpoint folder or an upstream policy folder
    unnorm_key: str | None = None  # statistics entry; default: derived from the suite (libero_spatial[_no_noops])
    num_images_in_input: int | None = None  # 1 = third-person, 2 = + wrist camera; default: the checkpoint's
    use_proprio: bool | None = None  # default: the checkpoint's
    center_crop: bool = True  # the model was trained with random-crop augmentation
    device: str = "cpu"

    # Suite
    task_suite_name: str = "libero_spatial"  # libero_{spatial,object,goal,10}, libero_90 or a LIBERO-PRO suite
    task_ids: list[int] | None = None  # subset of task ids (default: all)
    num_trials_per_task: int = 50
    instruction_source: str = "auto"  # auto: BDDL language for *_lan / *_task suites, task name otherwise
    max_steps_override: int | None = None  # replaces the suite's step budget (e.g. short smoke runs)
    num_settle_steps: int = NUM_SETTLE_STEPS
    seed: int = 7  # global RNG seed (python, numpy, torch) of the policy process
    env_seed: int = 0  # seed of every LIBERO env (upstream: 0)
    camera_resolution: int = 256

    # Execution
    num_envs: int = 1  # simulator processes feeding the policy; 0 = simulate in this process
    batch_policy_calls: bool = True  # one batched forward for all envs waiting at once (else one call per env)
    local_log_dir: str = "eval_logs/libero"
    save_videos: bool = False
    save_rollouts: bool = False  # per-episode npz (executed actions, proprio, init/final sim state)
    progress: bool = True

    # Logging
    use_wandb: bool = False
    wandb_project: str = "vla-adapter-libero-eval"
    wandb_entity: str | None = None
    run_name: str | None = None


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
        torch.manual_seed(seed)
    except ImportError:
        pass


def plan_episodes(cfg: EvalConfig, tasks: list[TaskSpec]) -> list[EpisodeSpec]:
    if cfg.num_trials_per_task < 1:
        raise ValueError(f"num_trials_per_task must be >= 1, got {cfg.num_trials_per_task}")
    ids = list(range(len(tasks))) if cfg.task_ids is None else list(cfg.task_ids)
    bad = [i for i in ids if not 0 <= i < len(tasks)]
    if bad or not ids:
        raise ValueError(f"task_ids {bad or ids} invalid for {cfg.task_suite_name}: it has tasks 0..{len(tasks) - 1}")
    max_steps = cfg.max_steps_override if cfg.max_steps_override is not None else max_steps_for(cfg.task_suite_name)
    if max_steps < 1:
        raise ValueError(f"max_steps_override must be >= 1, got {max_steps}")
    episodes = []
    for i in ids:
        task = tasks[i]
        if cfg.num_trials_per_task > task.num_init_states:
            raise ValueError(f"num_trials_per_task={cfg.num_trials_per_task} but {task.suite} task {i} has only "
                             f"{task.num_init_states} fixed init states")
        episodes += [EpisodeSpec(task=task, trial=k, max_steps=max_steps) for k in range(cfg.num_trials_per_task)]
    return episodes


def run_identity(cfg: EvalConfig, unnorm_key: str, num_images: int, use_proprio: bool) -> dict:
    """Settings an eval directory is tied to (resuming with different ones is refused)."""
    keep = ("pretrained_checkpoint", "task_suite_name", "center_crop",
            "instruction_source", "max_steps_override", "num_settle_steps", "seed", "env_seed", "camera_resolution")
    identity = {k: getattr(cfg, k) for k in keep}
    identity["pretrained_checkpoint"] = str(Path(cfg.pretrained_checkpoint).resolve()) if cfg.pretrained_checkpoint \
        else ""
    identity.update(unnorm_key=unnorm_key, num_images_in_input=num_images, use_proprio=use_proprio)
    return identity


def _init_wandb(cfg: EvalConfig):
    import wandb

    name = cfg.run_name or f"eval-{cfg.task_suite_name}-{Path(cfg.pretrained_checkpoint).name}"
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=name, config=asdict(cfg),
                      job_type="eval")


def run_evaluation(cfg: EvalConfig, policy=None, runner_factory=None) -> dict:
    """Evaluate and return the summary. `policy`: an already built policy (tests, benchmarks); else the
    checkpoint is loaded. `runner_factory(settings)`: inline-simulator override for tests (num_envs=0 only)."""
    if runner_factory is not None and cfg.num_envs != 0:
        raise ValueError("runner_factory replaces the inline simulator: it needs num_envs=0")
    tasks = load_suite_tasks(cfg.task_suite_name, cfg.instruction_source)  # validates the suite first
    episodes = plan_episodes(cfg, tasks)
    set_seed(cfg.seed)
    if policy is None:
        if not cfg.pretrained_checkpoint:
            raise ValueError("pass --pretrained_checkpoint (a checkpoint folder with dataset_statistics.json)")
        policy = load_policy_checkpoint(cfg.pretrained_checkpoint, device=cfg.device)
    unnorm_key = resolve_unnorm_key(policy_statistics_keys(policy), cfg.unnorm_key, cfg.task_suite_name)
    if base_suite(cfg.task_suite_name) and not unnorm_key.startswith(base_suite(cfg.task_suite_name)):
        print(f"note: evaluating {cfg.task_suite_name} with the action statistics of '{unnorm_key}' "
              "(the checkpoint's only entry / --unnorm_key)", file=sys.stderr)
    num_images, use_proprio = resolve_input_settings(policy, cfg.num_images_in_input, cfg.use_proprio)

    out_dir = Path(cfg.local_log_dir)
    store = ResultsStore(out_dir, run_identity(cfg, unnorm_key, num_images, use_proprio))
    todo = deque(e for e in episodes if not store.is_done(e.task.suite, e.task.task_id, e.trial))
    selected = [(e.task.task_id, e.trial) for e in episodes]
    settings = SimSettings(num_images=num_images, camera_resolution=cfg.camera_resolution,
                           env_seed=cfg.env_seed, num_settle_steps=cfg.num_settle_steps,
                           video_dir=str(out_dir / "videos") if cfg.save_videos else None,
                           rollout_dir=str(out_dir / "rollouts") if cfg.save_rollouts else None)
    for d in (settings.video_dir, settings.rollout_dir):
        if d:
            os.makedirs(d, exist_ok=True)
    policy_fn = PolicyRunner(policy, unnorm_key=unnorm_key, center_crop=cfg.center_crop, use_proprio=use_proprio,
                             num_images=num_images, batch=cfg.batch_policy_calls)
    wandb_run = _init_wandb(cfg) if cfg.use_wandb else None

    bar = tqdm(total=len(episodes), initial=len(episodes) - len(todo), disable=not cfg.progress,
               desc=f"{cfg.task_suite_name}", unit="ep", dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        if todo:
            num_envs = min(cfg.num_envs, len(todo)) if cfg.num_envs > 0 else 0
            with EnvPool(num_envs, settings, runner_factory=runner_factory) as pool:
                _drive(pool, todo, policy_fn, store, bar, wandb_run, cfg.task_suite_name, selected)
    finally:
        bar.close()

    summary = store.summary(cfg.task_suite_name, selected)
    summary.update({"unnorm_key": unnorm_key, "pretrained_checkpoint": cfg.pretrained_checkpoint,
                    "policy_calls": policy_fn.calls, "policy_rounds": policy_fn.rounds,
                    "wall_seconds_this_run": round(time.perf_counter() - t_start, 2)})
    store.write_summary(summary)
    if wandb_run is not None:
        wandb_run.log({"success_rate/total": summary["success_rate"], "num_episodes": summary["num_episodes"],
                       **{f"success_rate/{name}": t["success_rate"] for name, t in summary["per_task"].items()}})
        wandb_run.summary.update({"success_rate": summary["success_rate"], "num_episodes": summary["num_episodes"]})
        wandb_run.finish()
    return summary


def _drive(pool: EnvPool, todo: deque, policy_fn: PolicyRunner, store: ResultsStore, bar, wandb_run,
           suite: str, selected: list) -> None:
    """Keep every worker busy; answer all workers waiting for actions together."""
    busy = []
    for worker in pool.workers:
        if todo:
            worker.send("start", todo.popleft())
            busy.append(worker)
    while busy:
        requests = []
        for worker, (kind, payload) in pool.wait(busy):
            if kind == "obs":
                requests.append((worker, payload))
            elif kind == "done":
                store.add(payload)
                bar.update(1)
                running = store.summary(suite, selected)
                bar.set_postfix(success=f"{running['num_successes']}/{running['num_episodes']}")
                if wandb_run is not None:
                    wandb_run.log({"running/success_rate": running["success_rate"],
                                   "running/num_episodes": running["num_episodes"]})
                if todo:
                    worker.send("start", todo.popleft())
                else:
                    busy.remove(worker)
            else:
                raise RuntimeError(f"unexpected reply '{kind}' from simulator worker {worker.index}")
        if requests:
            chunks = policy_fn([payload for _, payload in requests])
            for (worker, _), chunk in zip(requests, chunks, strict=True):
                worker.send("act", chunk)


@draccus.wrap()
def main(cfg: EvalConfig) -> None:
    summary = run_evaluation(cfg)
    print(f"{summary['task_suite_name']}: {summary['num_successes']}/{summary['num_episodes']} successes "
          f"({100 * summary['success_rate']:.1f}%) -> {Path(cfg.local_log_dir) / 'summary.json'}")


if __name__ == "__main__":
    main()
