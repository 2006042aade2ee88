"""Closed-loop evaluation of a VLA-Adapter policy in LIBERO / LIBERO-PRO.

    python LIBERO/run_libero_eval.py --pretrained_checkpoint runs/<run>--20000_chkpt \
        --task_suite_name libero_spatial --num_envs 4 --local_log_dir eval_logs/spatial

Protocol (upstream VLA-Adapter / OpenVLA-OFT): the suite's fixed init states (trial i uses init state i), seed 7,
10 no-op settle steps, per-suite step budgets (spatial 220, object 280, goal 300, libero_10 520), images rotated
by 180 degrees and resized to 224 (center crop when the model was trained with crop augmentation), each predicted
chunk of 8 actions executed open-loop, un-normalised with the checkpoint's q01/q99, gripper binarised to
-1 open / +1 close, success as reported by the environment. Output: {local_log_dir}/episodes.jsonl and
{local_log_dir}/summary.json (+ wandb when --use_wandb). See docs/LIBERO_EVAL.md.

Trial k of a task is always the (k+1)-th reset of a fresh env seeded `env_seed` (as upstream), whatever
`--num_envs` and however often the evaluation was resumed: a task's trials run in order on one worker, workers
take whole tasks, and a resumed task replays the resets of its finished trials. An episode that raises is a failure
whose record holds the traceback; the evaluation goes on. Bad flags stop it before anything is built or written:
one line `error: <what> — <how to fix>`, exit 2 (`--debug true` shows the traceback).
"""


import json
import os
import random
import sys
import time
import traceback
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python LIBERO/run_libero_eval.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
from tqdm import tqdm

from LIBERO.env_pool import EnvPool
from LIBERO.libero_env import NUM_SETTLE_STEPS, EpisodeSpec, SimSettings
from LIBERO.policy_runner import (
    PolicyRunner,
    checkpoint_statistics,
    load_policy_checkpoint,
    policy_statistics_keys,
    resolve_input_settings,
    resolve_unnorm_key,
)
from LIBERO.results import SUMMARY_FILE, ResultsStore, success_rate_key
from LIBERO.suites import INSTRUCTION_SOURCES, TaskSpec, base_suite, load_suite_tasks, max_steps_for
from prismatic.cli_errors import UserError, cli_entry, parse_config
from prismatic.models.precision import DTYPE_CHOICES as DTYPES  # auto, float32, bfloat16
from prismatic.training.checkpoint_identity import checkpoint_identity, weight_files
from prismatic.training.metrics_log import WANDB_LOGIN_FIX

DEFAULT_WANDB_PROJECT = "vla-adapter-libero-eval"


@dataclass
class EvalConfig:
    # Model
    pretrained_checkpoint: str = ""  # this project's checkpoint folder or an upstream policy folder
    unnorm_key: str | None = None  # statistics entry; default: derived from the suite (libero_spatial[_no_noops])
    num_images_in_input: int | None = None  # 1 = third-person, 2 = + wrist camera; default: the checkpoint's
    use_proprio: bool | None = None  # default: the checkpoint's
    center_crop: bool | None = None  # eval center crop; default: the checkpoint's recorded setting
    device: str = "auto"  # auto = cuda when available, else cpu
    dtype: str = "auto"  # float32 | bfloat16; auto = bfloat16 on CUDA (as upstream), float32 on CPU

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
    wandb_project: str | None = None  # default: the training run's project (its config.yaml), else the default
    wandb_entity: str | None = None
    wandb_group: str | None = None  # default: the training run's group, else the checkpoint's run id
    wandb_tags: list[str] | None = None  # default: ["eval", <suite>]
    run_name: str | None = None
    # (--debug true: tracebacks for expected errors too; taken out of the arguments by prismatic.cli_errors)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
        torch.manual_seed(seed)
    except ImportError:
        pass


def plan_episodes(cfg: EvalConfig, tasks: list[TaskSpec]) -> list[EpisodeSpec]:
    """Every (task, trial) to evaluate, tasks in the given order and each task's trials in order."""
    if cfg.num_trials_per_task < 1:
        raise UserError(f"--num_trials_per_task {cfg.num_trials_per_task} runs no episode",
                         "pass a number >= 1 (upstream: 50)")
    ids = list(range(len(tasks))) if cfg.task_ids is None else list(cfg.task_ids)
    bad = [i for i in ids if not 0 <= i < len(tasks)]
    if bad or not ids:
        raise UserError(f"--task_ids {bad or ids} invalid for {cfg.task_suite_name}",
                         f"pick ids in 0..{len(tasks) - 1} (or omit --task_ids for all tasks)")
    if len(set(ids)) != len(ids):
        raise UserError(f"--task_ids {ids} repeats a task", "list each task id once")
    max_steps = cfg.max_steps_override if cfg.max_steps_override is not None else max_steps_for(cfg.task_suite_name)
    if max_steps < 1:
        raise UserError(f"--max_steps_override {max_steps} allows no step", "pass a number >= 1 or omit it")
    episodes = []
    for i in ids:
        task = tasks[i]
        if cfg.num_trials_per_task > task.num_init_states:
            raise UserError(f"--num_trials_per_task {cfg.num_trials_per_task} but {task.suite} task {i} has only "
                             f"{task.num_init_states} fixed init states",
                             f"pass --num_trials_per_task {task.num_init_states} or fewer")
        episodes += [EpisodeSpec(task=task, trial=k, max_steps=max_steps) for k in range(cfg.num_trials_per_task)]
    return episodes


def resolve_device(name: str) -> str:
    """"auto" -> cuda when available, else cpu; an explicit cuda device must exist."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} but CUDA is not available here", "use --device cpu (or auto)")
        if name != "cuda" and int(name[5:]) >= torch.cuda.device_count():
            raise UserError(f"--device {name} but only {torch.cuda.device_count()} CUDA devices are visible",
                             "pick an existing device index")
        return name
    raise UserError(f"--device '{name}' is not a device", "use auto, cpu, cuda or cuda:<index>")


def resolve_dtype(name: str, device: str):
    """"auto" -> bfloat16 on CUDA (upstream evaluates the VLA and head in bf16), float32 on CPU."""
    from prismatic.models.precision import resolve_dtype as resolve

    if name not in DTYPES:
        raise UserError(f"--dtype '{name}' is not supported", f"use one of {', '.join(DTYPES)}")
    return resolve(name, device)


def recorded_checkpoint_settings(folder: Path) -> dict:
    """Input settings a checkpoint folder records (None where it records none): num_images_in_input and
    use_proprio (policy_config.json), center_crop (the processor config saved with it)."""
    from prismatic.models.policy import POLICY_CONFIG_NAME
    from prismatic.models.processing_vla import PROCESSOR_CONFIG_NAME

    settings = {"num_images_in_input": None, "use_proprio": None, "center_crop": None}
    for name, keys in ((POLICY_CONFIG_NAME, ("num_images_in_input", "use_proprio")),
                       (PROCESSOR_CONFIG_NAME, ("center_crop",))):
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} is not valid JSON ({exc})", "restore the checkpoint's file") from None
            settings.update({k: data[k] for k in keys if k in data})
    return settings


def check_contradictions(cfg: EvalConfig, recorded: dict) -> None:
    """An explicit input setting that differs from the checkpoint's is refused (the model was trained with it)."""
    for name in ("num_images_in_input", "use_proprio", "center_crop"):
        given, stored = getattr(cfg, name), recorded.get(name)
        if given is not None and stored is not None and given != stored:
            raise UserError(f"--{name} {given} contradicts the checkpoint, which records {name}={stored}",
                             f"omit --{name} (the checkpoint's setting is used)")


def validate_config(cfg: EvalConfig, have_policy: bool = False) -> tuple[list[EpisodeSpec], str, object]:
    """Check every flag before anything is built or written: (episodes, device, torch dtype); UserError else."""
    if cfg.num_trials_per_task < 1:
        raise UserError(f"--num_trials_per_task {cfg.num_trials_per_task} runs no episode",
                         "pass a number >= 1 (upstream: 50)")
    if cfg.num_envs < 0:
        raise UserError(f"--num_envs {cfg.num_envs} is negative",
                         "pass the number of simulator processes (>= 1), or 0 to simulate in this process")
    if cfg.num_settle_steps < 0:
        raise UserError(f"--num_settle_steps {cfg.num_settle_steps} is negative", "pass 0 or more (upstream: 10)")
    if cfg.camera_resolution < 1:
        raise UserError(f"--camera_resolution {cfg.camera_resolution} is not a size", "pass 256 (LIBERO's)")
    if cfg.instruction_source not in INSTRUCTION_SOURCES:
        raise UserError(f"--instruction_source '{cfg.instruction_source}' is unknown",
                         f"use one of {', '.join(INSTRUCTION_SOURCES)}")
    if cfg.num_images_in_input not in (None, 1, 2):
        raise UserError(f"--num_images_in_input {cfg.num_images_in_input} is not supported",
                         "use 1 (third-person) or 2 (+ wrist), or omit it for the checkpoint's")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if not have_policy:
        if not cfg.pretrained_checkpoint:
            raise UserError("no --pretrained_checkpoint given",
                             "pass a checkpoint folder (runs/<run>--<step>_chkpt or a released policy folder)")
        folder = Path(cfg.pretrained_checkpoint)
        if not folder.is_dir():
            raise UserError(f"checkpoint folder {folder} does not exist", "check the --pretrained_checkpoint path")
        try:
            stats = checkpoint_statistics(folder)
        except ValueError as exc:
            raise UserError(str(exc), "copy dataset_statistics.json from the training run into the folder") \
                from None
        if not weight_files(folder):
            raise UserError(f"checkpoint folder {folder} holds no weight files (*.safetensors, *.pt)",
                             "point --pretrained_checkpoint at a complete checkpoint folder")
        check_contradictions(cfg, recorded_checkpoint_settings(folder))
        try:
            resolve_unnorm_key(list(stats), cfg.unnorm_key, cfg.task_suite_name)
        except ValueError as exc:
            raise UserError(str(exc), "pass one of the checkpoint's entries with --unnorm_key") from None
    out = Path(cfg.local_log_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--local_log_dir {out} is a file", "pass a directory path")
    if cfg.save_videos:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise UserError("--save_videos needs imageio-ffmpeg, which is not installed",
                             "pip install imageio==2.38.1 imageio-ffmpeg==0.8.1") from None
    try:
        tasks = load_suite_tasks(cfg.task_suite_name, cfg.instruction_source)
    except ValueError as exc:
        raise UserError(str(exc), "pass one of the valid suites with --task_suite_name") from None
    except ImportError as exc:
        raise UserError(str(exc), "install the LIBERO extra") from None
    return plan_episodes(cfg, tasks), device, dtype


def run_identity(cfg: EvalConfig, unnorm_key: str, num_images: int, use_proprio: bool,
                 center_crop: bool | None = None, dtype: str | None = None, weights_sha256: str | None = None) -> dict:
    """Settings an eval directory is tied to (resuming with different ones is refused): among them the
    checkpoint's weights hash, so a retrained checkpoint at the same path never mixes into an old evaluation."""
    keep = ("pretrained_checkpoint", "task_suite_name",
            "instruction_source", "max_steps_override", "num_settle_steps", "seed", "env_seed", "camera_resolution")
    identity = {k: getattr(cfg, k) for k in keep}
    identity["pretrained_checkpoint"] = str(Path(cfg.pretrained_checkpoint).resolve()) if cfg.pretrained_checkpoint \
        else ""
    identity.update(unnorm_key=unnorm_key, num_images_in_input=num_images, use_proprio=use_proprio,
                    center_crop=center_crop, dtype=dtype, weights_sha256=weights_sha256)
    return identity


def default_wandb_group(cfg: EvalConfig) -> str:
    """The training run's wandb group (`<experiment>/<suite>/<method>`, from the run's config.yaml next to the
    checkpoint) so the success rate lands beside the training curves; else the checkpoint's run id
    (`runs/<run id>--<step>_chkpt` -> `<run id>`), else the folder's name."""
    labels = training_run_labels(cfg)
    if labels is not None:
        return labels["group"]
    name = Path(cfg.pretrained_checkpoint).name if cfg.pretrained_checkpoint else "policy"
    head, sep, tail = name.rpartition("--")
    return head if sep and tail.endswith("_chkpt") else name


def training_run_labels(cfg: EvalConfig) -> dict | None:
    """wandb labels of the run that wrote the checkpoint (its `<run id>/config.yaml` beside `<run id>--<step>_chkpt`),
    the same `wandb_labels` finetune.py used, plus that run's wandb project; None when there is no such run."""
    if not cfg.pretrained_checkpoint:
        return None
    folder = Path(cfg.pretrained_checkpoint)
    head, sep, tail = folder.name.rpartition("--")
    config_file = folder.parent / head / "config.yaml"
    if not (sep and tail.endswith("_chkpt") and config_file.is_file()):
        return None
    import yaml

    from prismatic.training.metrics_log import wandb_labels

    config = yaml.safe_load(config_file.read_text()) or {}
    labels = wandb_labels(config)
    labels["config"]["train_run_id"] = head  # the parser joins this evaluation to that training run by it
    return {**labels, "project": config.get("wandb_project")}


def _init_wandb(cfg: EvalConfig, checkpoint: dict | None):
    import wandb

    name = cfg.run_name or f"eval-{cfg.task_suite_name}-{Path(cfg.pretrained_checkpoint).name}"
    labels = training_run_labels(cfg) or {}
    project = cfg.wandb_project or labels.get("project") or DEFAULT_WANDB_PROJECT
    Path(cfg.local_log_dir).mkdir(parents=True, exist_ok=True)
    try:  # mode: WANDB_MODE (offline runs land in <local_log_dir>/wandb/, where `wandb sync` finds them)
        return wandb.init(project=project, entity=cfg.wandb_entity, name=name, dir=str(cfg.local_log_dir),
                          group=cfg.wandb_group or default_wandb_group(cfg),
                          tags=list(cfg.wandb_tags) if cfg.wandb_tags else ["eval", cfg.task_suite_name],
                          config={**asdict(cfg), "checkpoint": checkpoint, **labels.get("config", {})},
                          job_type="eval")
    except wandb.errors.UsageError as exc:  # online without a login: one line with the fix
        raise UserError(f"--use_wandb True: {exc}", WANDB_LOGIN_FIX) from None


def resolve_center_crop(given: bool | None, policy) -> bool | None:
    """--center_crop, else the policy's processor setting (the checkpoint's recorded one); a contradiction with a
    policy object's own setting is refused like a contradiction with the folder's."""
    stored = getattr(getattr(policy, "processor", None), "center_crop", None)
    if given is not None and stored is not None and bool(given) != bool(stored):
        raise UserError(f"--center_crop {given} contradicts the checkpoint, which records center_crop={stored}",
                         "omit --center_crop (the checkpoint's setting is used)")
    if given is not None:
        return bool(given)
    return None if stored is None else bool(stored)


def run_evaluation(cfg: EvalConfig, policy=None, runner_factory=None) -> dict:
    """Evaluate and return the summary. `policy`: an already built policy (tests, benchmarks); else the
    checkpoint is loaded. `runner_factory(settings)`: inline-simulator override for tests (num_envs=0 only).
    Raises UserError (before anything is built or written) on bad settings."""
    if runner_factory is not None and cfg.num_envs != 0:
        raise ValueError("runner_factory replaces the inline simulator: it needs num_envs=0")
    episodes, device, dtype = validate_config(cfg, have_policy=policy is not None)
    from prismatic.run_lock import folder_lock

    # the log folder is this process's from here on (prismatic/run_lock.py): two evaluations never share one
    with folder_lock(Path(cfg.local_log_dir), "run_libero_eval",
                     fix="wait for that evaluation to end, or pass another --local_log_dir"):
        return _evaluate_locked(cfg, policy, runner_factory, episodes, device, dtype)


def _evaluate_locked(cfg: EvalConfig, policy, runner_factory, episodes: list, device, dtype) -> dict:
    checkpoint = checkpoint_identity(cfg.pretrained_checkpoint) if cfg.pretrained_checkpoint else None
    set_seed(cfg.seed)
    if policy is None:
        policy = load_policy_checkpoint(cfg.pretrained_checkpoint, device=device, dtype=dtype)
    try:
        unnorm_key = resolve_unnorm_key(policy_statistics_keys(policy), cfg.unnorm_key, cfg.task_suite_name)
        num_images, use_proprio = resolve_input_settings(policy, cfg.num_images_in_input, cfg.use_proprio)
    except ValueError as exc:
        raise UserError(str(exc), "omit the flag, or pass a value the checkpoint supports") from None
    center_crop = resolve_center_crop(cfg.center_crop, policy)
    if base_suite(cfg.task_suite_name) and not unnorm_key.startswith(base_suite(cfg.task_suite_name)):
        print(f"note: evaluating {cfg.task_suite_name} with the action statistics of '{unnorm_key}' "
              "(the checkpoint's only entry / --unnorm_key)", file=sys.stderr)

    out_dir = Path(cfg.local_log_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    identity = run_identity(cfg, unnorm_key, num_images, use_proprio, center_crop, dtype_name,
                            checkpoint["weights_sha256"] if checkpoint else None)
    try:
        store = ResultsStore(out_dir, identity)
    except ValueError as exc:
        raise UserError(str(exc), "resume with the original settings or pass another --local_log_dir") from None
    selected = [(e.task.task_id, e.trial) for e in episodes]
    tasks = _pending_by_task(episodes, store)
    settings = SimSettings(num_images=num_images, camera_resolution=cfg.camera_resolution,
                           env_seed=cfg.env_seed, num_settle_steps=cfg.num_settle_steps,
                           video_dir=str(out_dir / "videos") if cfg.save_videos else None,
                           rollout_dir=str(out_dir / "rollouts") if cfg.save_rollouts else None)
    for d in (settings.video_dir, settings.rollout_dir):
        if d:
            os.makedirs(d, exist_ok=True)
    policy_fn = PolicyRunner(policy, unnorm_key=unnorm_key, center_crop=center_crop, use_proprio=use_proprio,
                             num_images=num_images, batch=cfg.batch_policy_calls)
    wandb_run = _init_wandb(cfg, checkpoint) if cfg.use_wandb else None

    num_todo = sum(len(q) for q in tasks.values())
    if num_todo and (out_dir / SUMMARY_FILE).exists():
        (out_dir / SUMMARY_FILE).unlink()  # derived from episodes.jsonl; rewritten when this run ends
    bar = tqdm(total=len(episodes), initial=len(episodes) - num_todo, disable=not cfg.progress,
               desc=f"{cfg.task_suite_name}", unit="ep", dynamic_ncols=True)
    t_start = time.perf_counter()
    try:
        if num_todo:
            # parallel across tasks only: a task's trials run in order on one worker (see module docstring)
            num_envs = min(cfg.num_envs, len(tasks)) if cfg.num_envs > 0 else 0
            with EnvPool(num_envs, settings, runner_factory=runner_factory) as pool:
                _drive(pool, tasks, policy_fn, store, bar, wandb_run, cfg.task_suite_name, selected)
    finally:
        bar.close()

    summary = store.summary(cfg.task_suite_name, selected)
    summary.update({"num_planned_episodes": len(episodes), "complete": summary["num_episodes"] == len(episodes),
                    "unnorm_key": unnorm_key, "pretrained_checkpoint": cfg.pretrained_checkpoint,
                    "checkpoint": checkpoint, "device": device, "dtype": dtype_name, "center_crop": center_crop,
                    "policy_calls": policy_fn.calls, "policy_rounds": policy_fn.rounds,
                    "wall_seconds_this_run": round(time.perf_counter() - t_start, 2)})
    store.write_summary(summary)
    if wandb_run is not None:
        wandb_run.log({success_rate_key(cfg.task_suite_name): summary["success_rate"],
                       "success_rate/total": summary["success_rate"], "num_episodes": summary["num_episodes"],
                       **{f"success_rate/{name}": t["success_rate"] for name, t in summary["per_task"].items()}})
        wandb_run.summary.update({success_rate_key(cfg.task_suite_name): summary["success_rate"],
                                  "success_rate": summary["success_rate"], "num_episodes": summary["num_episodes"],
                                  "num_errors": summary["num_errors"]})
        wandb_run.finish()
    return summary


def _pending_by_task(episodes: list[EpisodeSpec], store: ResultsStore) -> OrderedDict:
    """{(suite, task_id): [episodes not yet in the store, trial order]}, tasks with nothing left dropped."""
    tasks: OrderedDict = OrderedDict()
    for e in episodes:
        if not store.is_done(e.task.suite, e.task.task_id, e.trial):
            tasks.setdefault((e.task.suite, e.task.task_id), []).append(e)
    return tasks


def _drive(pool: EnvPool, tasks: OrderedDict, policy_fn: PolicyRunner, store: ResultsStore, bar, wandb_run,
           suite: str, selected: list) -> None:
    """Each worker takes a whole task and runs its trials in order (so trial k stays the (k+1)-th reset of the
    worker's fresh env); all workers waiting for actions at once are answered in one policy round."""
    queues = OrderedDict((key, list(eps)) for key, eps in tasks.items())
    unassigned = list(queues)
    owned: dict[int, tuple] = {}

    def next_episode(worker):
        key = owned.get(worker.index)
        if key is None or not queues[key]:
            if not unassigned:
                return None
            key = owned[worker.index] = unassigned.pop(0)
        return queues[key].pop(0)

    busy = []
    for worker in pool.workers:
        spec = next_episode(worker)
        if spec is not None:
            worker.send("start", spec)
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
                if payload.get("error"):
                    print(f"warning: episode {payload['suite']} task {payload['task_id']} trial {payload['trial']} "
                          f"raised, counted as a failure:\n{payload['error']}", file=sys.stderr)
                if wandb_run is not None:
                    wandb_run.log({"running/success_rate": running["success_rate"],
                                   "running/num_episodes": running["num_episodes"]})
                spec = next_episode(worker)
                if spec is not None:
                    worker.send("start", spec)
                else:
                    busy.remove(worker)
            else:
                raise RuntimeError(f"unexpected reply '{kind}' from simulator worker {worker.index}")
        if requests:
            for (worker, _), chunk in zip(requests, _answer(policy_fn, [p for _, p in requests]), strict=True):
                if isinstance(chunk, PolicyFailure):
                    worker.send("abort", chunk.traceback)
                else:
                    worker.send("act", chunk)


@dataclass
class PolicyFailure:
    """The policy raised on one observation: its episode ends as a failure carrying this traceback."""

    traceback: str = field(repr=False)


def _answer(policy_fn: PolicyRunner, payloads: list) -> list:
    """Action chunks for `payloads`; when the (batched) call raises, each observation is retried alone so only the
    episodes whose observation makes the policy raise fail."""
    try:
        return policy_fn(payloads)
    except Exception:
        if len(payloads) == 1:
            return [PolicyFailure(traceback.format_exc())]
    answers = []
    for payload in payloads:
        try:
            answers.append(policy_fn([payload])[0])
        except Exception:
            answers.append(PolicyFailure(traceback.format_exc()))
    return answers


@cli_entry("run_libero_eval")
def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(EvalConfig, argv)
    summary = run_evaluation(cfg)
    print(f"{summary['task_suite_name']}: {summary['num_successes']}/{summary['num_episodes']} successes "
          f"({100 * summary['success_rate']:.1f}%) -> {Path(cfg.local_log_dir) / 'summary.json'}")
    if summary["num_errors"]:
        print(f"warning: {summary['num_errors']} episodes raised and count as failures; their tracebacks are the "
              f"'error' entries of {Path(cfg.local_log_dir) / 'episodes.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
