"""The CRaFT experiment grids (table1 | fewshot | ablations): train, measure drift, evaluate, every entry resumable.

The three shell entry points call `python craft_experiments/common_utils/grid.py <experiment>`; everything
configurable comes from environment variables (docs/EXPERIMENTS_AND_TRAINING.md), validated before anything runs.

Per grid entry (a run id encoding every flag the grid varies: suite, shots, method variant, lr, global batch, LoRA
rank, ε and η_λ for CRaFT, seed):
  [cache]  offline anchors only: vla-scripts/build_craft_cache.py, once per (suite, preset, layers, anchor, crop)
  [train]  vla-scripts/finetune.py (with --retention_monitor True); skipped when the final checkpoint is complete,
           resumed (--resume True) from the newest complete checkpoint below the final step
  [drift]  vla-scripts/measure_drift.py on the final checkpoint against θ0 (CONFIG_FILE_PATH or VLM_PATH)
  [eval]   LIBERO/run_libero_eval.py on the final checkpoint
A drift report or an evaluation of another checkpoint than the final one (e.g. after MAX_STEPS changed) is moved
aside and redone (run_layout.py). DRY_RUN=1 prints the commands (`[DRY_RUN][kind] argv`), SMOKE=1 runs the same grid
on the tiny preset for a few steps under a separate output root.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from progress import Progress, duration  # noqa: E402
from recipe import (  # noqa: E402
    CRAFT_TIME_FACTOR,
    Recipe,
    RecipeError,
    accumulation,
    disk_gb,
    epoch_steps,
    gpu_hours,
    load_recipe,
    recipe_lines,
    recipe_steps,
    samples_departure,
    schedule,
)
from run_layout import (  # noqa: E402
    COMPLETE_MARKER,
    DRIFT_REPORT,
    EVAL_SUMMARY,
    drift_stale_reason,
    final_checkpoint,
    read_json,
    stale_reason,
    step_eval_summary,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = ("table1", "fewshot", "ablations")
# LIBERO facts (VLA_ADAPTER_FACTS §5): episodes and steps per suite; a frame needs 7 future actions; 10 tasks each.
SUITE_EPISODES = {"libero_spatial": 432, "libero_object": 454, "libero_goal": 428, "libero_10": 379}
SUITE_STEPS = {"libero_spatial": 52970, "libero_object": 66984, "libero_goal": 52042, "libero_10": 101469}
TASKS_PER_SUITE = 10
CHUNK_TAIL = 7
ABLATION_GROUPS = ("reference", "projection", "dual", "anchor_type", "epsilon", "layer", "anchor_source", "related")
SMOKE_ABLATION_GROUPS = ("reference", "projection", "anchor_source")  # SMOKE without SMOKE_FULL: 4 runs + 1 cache
PLAIN_METHODS = {"baseline": ["--use_craft", "False"],
                 "align": ["--use_craft", "False", "--retention_method", "align"],
                 "consft": ["--use_craft", "False", "--retention_method", "consft"],
                 "ki": ["--use_craft", "False", "--retention_method", "ki"],  # knowledge insulation (issue 25)
                 "freeze": ["--use_craft", "False", "--freeze_vision_backbone", "True"]}
DEFAULT_METHODS = "baseline craft ki"  # Table 1 and few-shot rows; KI is the strongest published rival of CRaFT
NUMBER = re.compile(r"^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$")


class GridError(Exception):
    """A bad environment setting: `error: <what> — <how to fix>`, exit 2, before anything runs."""


def fail(what: str, fix: str) -> GridError:
    return GridError(f"{what} — {fix}")


# ---------------------------------------------------------------------------------------------------------------------
# Settings from the environment
# ---------------------------------------------------------------------------------------------------------------------
def _on(name: str) -> bool:
    return os.environ.get(name, "0") in ("1", "true", "True")


def _int(name: str, value: str, minimum: int) -> int:
    if not re.fullmatch(r"[0-9]+", value.strip()):
        raise fail(f"{name} must be a non-negative integer, got '{value}'", f"set {name} to a whole number")
    if int(value) < minimum:
        raise fail(f"{name} must be >= {minimum}, got '{value}'", f"set {name} to at least {minimum}")
    return int(value)


def _number(name: str, value: str) -> str:
    if not NUMBER.match(value.strip()):
        raise fail(f"{name} must be a non-negative number, got '{value}'", f"set {name} like 0.1 or 5e-4")
    return value.strip()


def _bool(name: str, value: str) -> str:
    if value not in ("True", "False"):
        raise fail(f"{name} must be True or False (finetune.py's spelling), got '{value}'", f"set {name}=True or False")
    return value


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


@dataclass
class Settings:
    experiment: str
    dry_run: bool
    smoke: bool
    skip_eval: bool
    python: str
    torchrun: str
    seeds: list[int]
    suites: list[str]
    batch_size: int
    grad_accum: int
    lr: str
    lora_rank: int
    epochs: int | None  # EPOCHS: an explicit override of the recipe's steps
    save_freq: int
    lr_schedule: str  # upstream (no warm-up, no decay) | project (WARMUP_PERCENT / DECAY_PERCENT)
    warmup_percent: int
    decay_percent: int
    save_latest_only: str
    image_aug: str
    num_gpus: int
    preset: str
    num_workers: str
    wandb_project: str
    wandb_entity: str
    wandb_mode: str
    auto_resume: bool
    epsilon: str
    dual_lr: str
    monitor_freq: int
    eval_trials: int
    eval_seed: int
    eval_extra: list[str]
    eval_device: str
    num_envs: int
    eval_every_kth: int  # EVAL_EVERY_KTH_CHECKPOINT: also evaluate every k-th saved checkpoint (0: final only)
    drift: bool
    drift_samples: int
    data_root: str
    vlm_path: str
    config_file_path: str
    output_root: Path
    smoke_max_steps: int = 0
    invoke_dir: Path = field(default_factory=Path.cwd)
    recipes: dict[str, Recipe] = field(default_factory=dict)
    departures: list[str] = field(default_factory=list)  # how the grid departs from the recipe (all suites)

    @property
    def run_root(self) -> Path:
        return self.output_root / self.experiment

    @property
    def cache_root(self) -> Path:
        return self.output_root / "craft_cache"

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.num_gpus

    @property
    def theta0(self) -> str:
        """The folder θ0 is loaded from (drift reference), empty for a tiny model built from scratch."""
        return self.config_file_path or self.vlm_path


def _abs(path: str, invoke_dir: Path) -> str:
    return path if not path or path.startswith("/") else str(invoke_dir / path)


def _default_python() -> str:
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.is_file() else sys.executable


def _default_torchrun() -> str:
    venv = REPO_ROOT / ".venv" / "bin" / "torchrun"
    if venv.is_file():
        return str(venv)
    beside = Path(sys.executable).with_name("torchrun")
    return str(beside) if beside.is_file() else "torchrun"


def _optional(name: str, minimum: int) -> int | None:
    value = os.environ.get(name, "")
    return _int(name, value, minimum) if value.strip() else None


def _recipes(suites: list[str]) -> dict[str, Recipe]:
    try:
        recipes = {suite: load_recipe(suite) for suite in suites}
    except RecipeError as exc:
        raise fail(str(exc), "restore craft_experiments/recipes/ from git") from None
    for key in ("global_batch", "learning_rate", "lora_rank"):  # one value per grid: run ids name it once
        if len({str(r[key]) for r in recipes.values()}) > 1:
            raise fail(f"the recipes of {' '.join(suites)} differ in {key}", "run the suites separately (SUITES)")
    return recipes


def load_settings(experiment: str, invoke_dir: Path) -> Settings:
    dry, smoke = _on("DRY_RUN"), _on("SMOKE")
    if _on("SMOKE_SKIP_EVAL") and not smoke:
        raise fail("SMOKE_SKIP_EVAL=1 is only allowed together with SMOKE=1", "a real grid must be evaluated")
    # SMOKE alone is a small selection that runs whole in minutes (docs: totals); SMOKE_FULL=1 the whole grid
    small = smoke and not _on("SMOKE_FULL")
    default_suites = "libero_spatial" if experiment == "ablations" or small else " ".join(SUITE_EPISODES)
    seeds_text, suites_text = _env("SEEDS", "7" if small else "7 42 123"), _env("SUITES", default_suites)
    if not seeds_text.split():
        raise fail("SEEDS is empty", "set SEEDS, e.g. SEEDS='7 42 123'")
    if not suites_text.split():
        raise fail("SUITES is empty", f"set SUITES to some of: {' '.join(SUITE_EPISODES)}")
    for suite in suites_text.split():
        if suite not in SUITE_EPISODES:
            raise fail(f"SUITES: unknown suite '{suite}'", f"known: {' '.join(SUITE_EPISODES)}")
    recipes = _recipes(suites_text.split())
    recipe = next(iter(recipes.values()))
    data_root = _env("DATA_ROOT", str(REPO_ROOT / "datasets/rlds"))
    vlm_path = _env("VLM_PATH", str(REPO_ROOT / "pretrained_models/prism-qwen25-extra-dinosiglip-224px-0_5b"))
    output_root = _env("OUTPUT_ROOT", str(REPO_ROOT / "runs/craft_experiments"))
    config_file_path = _env("CONFIG_FILE_PATH", "")
    lr_schedule = _env("LR_SCHEDULE", "upstream")
    if lr_schedule not in ("upstream", "project"):
        raise fail(f"LR_SCHEDULE must be upstream or project, got '{lr_schedule}'",
                   "unset it for upstream's schedule (no warm-up, no decay)")
    if lr_schedule == "upstream" and ("WARMUP_PERCENT" in os.environ or "DECAY_PERCENT" in os.environ):
        raise fail("WARMUP_PERCENT / DECAY_PERCENT only apply to LR_SCHEDULE=project",
                   "set LR_SCHEDULE=project, or unset them for upstream's schedule")
    departures = []
    lr = _number("LEARNING_RATE", _env("LEARNING_RATE", str(recipe["learning_rate"])))
    lora_rank = _int("LORA_RANK", _env("LORA_RANK", str(recipe["lora_rank"])), 1)
    image_aug = _bool("IMAGE_AUG", _env("IMAGE_AUG", str(recipe["image_aug"])))
    num_gpus = _int("NUM_GPUS", _env("NUM_GPUS", "1"), 1)
    target = int(recipe["global_batch"])
    # upstream's 16 per GPU, fewer when more GPUs than 64 / 16 (8 GPUs x 8 = 64): accumulation makes up the rest
    default_batch = 16 if target % (16 * num_gpus) == 0 or target % num_gpus else target // num_gpus
    batch_size = _int("BATCH_SIZE", _env("BATCH_SIZE", str(default_batch)), 1)
    grad_accum, notes = accumulation(target, batch_size, num_gpus,
                                     _optional("GRAD_ACCUMULATION_STEPS", 1))
    departures += notes
    if float(lr) != float(recipe["learning_rate"]):
        departures.append(f"learning rate {lr} instead of the recipe's {recipe['learning_rate']} (LEARNING_RATE)")
    if lora_rank != int(recipe["lora_rank"]):
        departures.append(f"LoRA rank {lora_rank} instead of the recipe's {recipe['lora_rank']} (LORA_RANK)")
    if image_aug != str(recipe["image_aug"]):
        departures.append(f"image augmentation {image_aug} instead of the recipe's {recipe['image_aug']} (IMAGE_AUG)")
    if lr_schedule == "project":
        departures.append("the project's lr schedule (LR_SCHEDULE=project: warm-up over WARMUP_PERCENT, decay from "
                          "DECAY_PERCENT of the steps) instead of upstream's (none)")
    values = dict(
        batch_size=batch_size, grad_accum=grad_accum, lora_rank=lora_rank, num_gpus=num_gpus,
        save_freq=_int("SAVE_FREQ", _env("SAVE_FREQ", str(recipe["save_freq"])), 1),
        wandb_mode=_env("WANDB_MODE", "offline"),  # as finetune.py: online needs a login, offline never fails
        eval_trials=_int("EVAL_TRIALS_PER_TASK", _env("EVAL_TRIALS_PER_TASK", "50"), 1),
        monitor_freq=_int("RETENTION_MONITOR_FREQ", _env("RETENTION_MONITOR_FREQ", "100"), 1),
        drift_samples=_int("DRIFT_NUM_SAMPLES", _env("DRIFT_NUM_SAMPLES", "256"), 2),
        num_workers=_env("NUM_WORKERS", ""), preset="real", eval_extra=[], smoke_max_steps=0,
    )
    if smoke:  # tiny preset, a few steps, one short episode: proves the grid runs end to end, says nothing else
        data_root, vlm_path = _env("SMOKE_DATA_ROOT", ""), _env("SMOKE_VLM_PATH", "")
        if not data_root:
            if not dry:
                raise fail("SMOKE=1 needs SMOKE_DATA_ROOT (a folder holding the tiny <suite>_no_noops datasets)",
                           "create it with `python craft_experiments/common_utils/make_smoke_data.py --output_dir "
                           "runs/smoke_data` (it also writes the tiny θ0 for SMOKE_VLM_PATH)")
            data_root = "$SMOKE_DATA_ROOT"
        output_root = _env("OUTPUT_ROOT", str(REPO_ROOT / "runs/craft_experiments_smoke"))
        config_file_path = _env("SMOKE_CONFIG_FILE_PATH", "")
        steps = _int("SMOKE_MAX_STEPS", _env("SMOKE_MAX_STEPS", "4"), 1)
        departures = ["SMOKE: the tiny preset for a few steps, batch SMOKE_BATCH_SIZE, no accumulation; the numbers "
                      "are placeholders, not the recipe's"]
        values.update(
            preset="tiny", smoke_max_steps=steps, save_freq=steps,
            batch_size=_int("SMOKE_BATCH_SIZE", _env("SMOKE_BATCH_SIZE", "2"), 1), grad_accum=1,
            lora_rank=_int("SMOKE_LORA_RANK", _env("SMOKE_LORA_RANK", "4"), 1),
            num_gpus=_int("SMOKE_NUM_GPUS", _env("SMOKE_NUM_GPUS", "1"), 1), num_workers="0",
            eval_trials=1,
            eval_extra=["--task_ids", "[0]", "--max_steps_override",
                        str(_int("SMOKE_EVAL_MAX_STEPS", _env("SMOKE_EVAL_MAX_STEPS", "20"), 1))],
            monitor_freq=max(1, steps // 2), drift_samples=_int("SMOKE_DRIFT_NUM_SAMPLES",
                                                                _env("SMOKE_DRIFT_NUM_SAMPLES", "8"), 2))
    if "SMOKE_WANDB_MODE" in os.environ:  # WANDB_MODE means the same with and without SMOKE
        raise fail("SMOKE_WANDB_MODE is gone", "set WANDB_MODE (online | offline | disabled), with or without SMOKE")
    if values["wandb_mode"] not in ("online", "offline", "disabled"):
        raise fail(f"WANDB_MODE must be online, offline or disabled, got '{values['wandb_mode']}'",
                   "set WANDB_MODE=offline to log without network")
    eval_every_kth = _int("EVAL_EVERY_KTH_CHECKPOINT", _env("EVAL_EVERY_KTH_CHECKPOINT", "0"), 0)
    if eval_every_kth and _env("SAVE_LATEST_CHECKPOINT_ONLY", "True") != "False":
        raise fail("EVAL_EVERY_KTH_CHECKPOINT needs the earlier checkpoints, which SAVE_LATEST_CHECKPOINT_ONLY=True "
                   "deletes", "set SAVE_LATEST_CHECKPOINT_ONLY=False as well (disk: one checkpoint per SAVE_FREQ)")
    # "auto" goes to the evaluation as is: it picks CUDA or CPU on the node that runs it, not where this prints
    eval_device = _env("EVAL_DEVICE", "auto")
    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", eval_device):
        raise fail(f"EVAL_DEVICE must be auto, cpu, cuda or cuda:<index>, got '{eval_device}'",
                   "unset it for auto (CUDA when the evaluating node has it)")
    return Settings(
        experiment=experiment, dry_run=dry, smoke=smoke, skip_eval=smoke and _on("SMOKE_SKIP_EVAL"),
        python=_env("PYTHON", "") or _default_python(), torchrun=_env("TORCHRUN", "") or _default_torchrun(),
        seeds=[_int("SEEDS entry", s, 0) for s in seeds_text.split()], suites=suites_text.split(),
        lr=lr, epochs=_optional("EPOCHS", 1), lr_schedule=lr_schedule,
        warmup_percent=_int("WARMUP_PERCENT", _env("WARMUP_PERCENT", "10"), 0),
        decay_percent=_int("DECAY_PERCENT", _env("DECAY_PERCENT", "80"), 1),
        save_latest_only=_bool("SAVE_LATEST_CHECKPOINT_ONLY", _env("SAVE_LATEST_CHECKPOINT_ONLY", "True")),
        image_aug=image_aug,
        wandb_project=_env("WANDB_PROJECT", "vla-craft-training"), wandb_entity=_env("WANDB_ENTITY", ""),
        auto_resume=_env("AUTO_RESUME", "1") in ("1", "true", "True"),
        epsilon=_number("CRAFT_RETENTION_BUDGET",
                        _env("CRAFT_RETENTION_BUDGET", str(recipe["craft_retention_budget"]))),
        dual_lr=_number("CRAFT_DUAL_LR", _env("CRAFT_DUAL_LR", str(recipe["craft_dual_lr"]))),
        eval_seed=_int("EVAL_SEED", _env("EVAL_SEED", "7"), 0), eval_device=eval_device, eval_every_kth=eval_every_kth,
        num_envs=_int("NUM_ENVS", _env("NUM_ENVS", "1"), 0), drift=_env("MEASURE_DRIFT", "1") != "0",
        data_root=data_root if data_root.startswith("$") else _abs(data_root, invoke_dir),
        vlm_path=_abs(vlm_path, invoke_dir), config_file_path=_abs(config_file_path, invoke_dir),
        output_root=Path(_abs(output_root, invoke_dir)), invoke_dir=invoke_dir, recipes=recipes,
        departures=departures, **values)


# ---------------------------------------------------------------------------------------------------------------------
# Grid entries
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheSpec:
    suite: str
    raw_layer: str = ""
    aq_layer: str = ""
    anchor_type: str = "concat"
    seed: int | None = None  # only for a scratch tiny θ0, which depends on the seed


@dataclass
class Entry:
    run_id: str
    suite: str
    seed: int
    steps: int
    note: str
    flags: list[str]
    cache: CacheSpec | None = None
    shots: int | None = None


def max_steps(s: Settings, suite: str, shots: int | None = None) -> int:
    """The recipe's steps for the suite (k-shot: scaled by the episodes seen, recipe.py); overrides: MAX_STEPS,
    MAX_STEPS_<SUITE> (full data), EPOCHS (passes over the frames at the global batch); SMOKE: SMOKE_MAX_STEPS."""
    if s.smoke:
        return s.smoke_max_steps
    override = os.environ.get("MAX_STEPS") or (os.environ.get(f"MAX_STEPS_{suite.upper()}") if shots is None else None)
    if override:
        return _int("MAX_STEPS", override, 1)
    episodes = SUITE_EPISODES[suite]
    if s.epochs is not None:
        frames = SUITE_STEPS[suite] - CHUNK_TAIL * episodes
        if shots is not None and shots * TASKS_PER_SUITE < episodes:
            frames = frames * shots * TASKS_PER_SUITE // episodes
        return epoch_steps(s.epochs, frames, s.global_batch, s.save_freq)
    return recipe_steps(s.recipes[suite], episodes, shots, TASKS_PER_SUITE)


def steps_departure(s: Settings, suite: str, shots: int | None, steps: int) -> str | None:
    """How a suite's run length departs from the recipe (None: it does not), for the banner."""
    if s.smoke:
        return None
    why = ("MAX_STEPS" if os.environ.get("MAX_STEPS") else f"MAX_STEPS_{suite.upper()}"
           if os.environ.get(f"MAX_STEPS_{suite.upper()}") and shots is None else
           f"EPOCHS={s.epochs}" if s.epochs is not None else "")
    note = samples_departure(steps, s.global_batch, s.recipes[suite], shots, SUITE_EPISODES[suite], TASKS_PER_SUITE)
    if note is None:
        return None
    label = f"{suite}" + (f" {shots}-shot" if shots is not None else "")
    return f"{label}: {steps} steps{f' ({why})' if why else ''}, {note}"


def craft_flags(s: Settings, budget: str | None = None, projection: str = "True", dual: str = "True",
                fixed_lambda: str = "", raw_layer: str = "", aq_layer: str = "", anchor_type: str = "concat",
                anchor_source: str = "online", cache_dir: str = "") -> list[str]:
    flags = ["--use_craft", "True", "--craft_retention_budget", budget or s.epsilon, "--craft_dual_lr", s.dual_lr,
             "--craft_enable_projection", projection, "--craft_enable_dual", dual]
    if fixed_lambda:
        flags += ["--craft_fixed_lambda", fixed_lambda]
    if raw_layer:
        flags += ["--craft_raw_layer", raw_layer]
    if aq_layer:
        flags += ["--craft_aq_layer", aq_layer]
    flags += ["--craft_anchor_type", anchor_type, "--craft_anchor_source", anchor_source]
    if cache_dir:
        flags += ["--craft_cache_dir", cache_dir]
    return flags


def method_flags(s: Settings, method: str) -> list[str]:
    if method == "craft":
        return craft_flags(s)
    if method in PLAIN_METHODS:
        return list(PLAIN_METHODS[method])
    raise fail(f"METHODS: unknown method '{method}'", f"known: craft {' '.join(PLAIN_METHODS)}")


def make_run_id(s: Settings, prefix: str, suite: str, label: str, seed: int, flags: list[str],
                shots: int | None = None) -> str:
    """Every flag the grid varies: suite, shots, variant, lr, global batch, LoRA rank, ε and η_λ (CRaFT), seed."""
    parts = [prefix, suite] + ([f"{shots}shot"] if shots is not None else []) + [label, f"lr{s.lr}",
                                                                                  f"b{s.global_batch}",
                                                                                  f"r{s.lora_rank}"]
    if "--craft_retention_budget" in flags:
        parts += [f"eps{flags[flags.index('--craft_retention_budget') + 1]}", f"dlr{s.dual_lr}"]
    return "-".join(parts + [f"s{seed}"])


def table1_entries(s: Settings) -> list[Entry]:
    methods = _env("METHODS", DEFAULT_METHODS).split()
    out = []
    for suite in s.suites:
        steps = max_steps(s, suite)
        for seed in s.seeds:
            for method in methods:
                flags = method_flags(s, method)
                out.append(Entry(make_run_id(s, "t1", suite, method, seed, flags), suite, seed, steps, method, flags))
    return out


def fewshot_entries(s: Settings) -> list[Entry]:
    methods = _env("METHODS", DEFAULT_METHODS).split()
    smoke_shots = "1 2" if _on("SMOKE_FULL") else "1"
    shots_list = [_int("SHOTS entry", v, 1) for v in (_env("SMOKE_SHOTS", smoke_shots) if s.smoke
                                                       else _env("SHOTS", "5 10")).split()]
    out = []
    for suite in s.suites:
        for shots in shots_list:
            steps = max_steps(s, suite, shots)
            for seed in s.seeds:
                for method in methods:
                    flags = ["--num_demos_per_task", str(shots), *method_flags(s, method)]
                    out.append(Entry(make_run_id(s, "fs", suite, method, seed, flags, shots), suite, seed, steps,
                                     f"{shots}shot-{method}", flags, shots=shots))
    return out


def _same_number(a: str, b: str) -> bool:
    return float(a) == float(b)


def ablation_entries(s: Settings) -> list[Entry]:
    small = s.smoke and not _on("SMOKE_FULL")
    groups = _env("ABLATIONS", " ".join(SMOKE_ABLATION_GROUPS if small else ABLATION_GROUPS)).split()
    for group in groups:
        if group not in ABLATION_GROUPS:
            raise fail(f"ABLATIONS: unknown group '{group}'", f"known: {' '.join(ABLATION_GROUPS)}")
    fixed_lambdas = [_number("FIXED_LAMBDAS entry", v) for v in _env("FIXED_LAMBDAS", "0 0.1 1").split()]
    epsilons = [_number("EPSILON_SWEEP entry", v) for v in _env("EPSILON_SWEEP", "0.02 0.05 0.2 0.5").split()]
    raw_layers = [str(_int("RAW_LAYER_SWEEP entry", v, 0)) for v in
                  (_env("SMOKE_RAW_LAYER_SWEEP", "1 3") if s.smoke else _env("RAW_LAYER_SWEEP", "6 18")).split()]
    out: list[Entry] = []
    for suite in s.suites:
        steps = max_steps(s, suite)

        def variant(label: str, flags: list[str], offline: bool = False, suite: str = suite,
                    steps: int = steps) -> None:
            for seed in s.seeds:
                # a scratch tiny θ0 depends on the run's seed: one cache per seed then, else one per suite
                cache = CacheSpec(suite, seed=None if s.theta0 else seed) if offline else None
                seed_flags = flags + (["--craft_cache_dir", str(cache_dir(s, cache))] if cache else [])
                out.append(Entry(make_run_id(s, "abl", suite, label, seed, seed_flags), suite, seed, steps, label,
                                 seed_flags, cache))

        if "reference" in groups:
            variant("baseline", method_flags(s, "baseline"))
            variant("craft", craft_flags(s))
        if "projection" in groups:
            variant("craft-noproj", craft_flags(s, projection="False"))
        if "dual" in groups:
            for lam in fixed_lambdas:
                variant(f"craft-fixlam{lam}", craft_flags(s, dual="False", fixed_lambda=lam))
        if "anchor_type" in groups:
            for anchor in ("raw_only", "aq_only"):
                variant(f"craft-anchor_{anchor}", craft_flags(s, anchor_type=anchor))
        if "epsilon" in groups:
            for eps in epsilons:
                if _same_number(eps, s.epsilon):
                    print(f"# epsilon {eps} is the reference CRaFT run; not repeated")
                    continue
                variant(f"craft-eps{eps}", craft_flags(s, budget=eps))
        if "layer" in groups:
            for m in raw_layers:
                variant(f"craft-m{m}", craft_flags(s, raw_layer=m))
        if "anchor_source" in groups:
            variant("craft-offline", craft_flags(s, anchor_source="offline"), offline=True)
        if "related" in groups:
            variant("align", method_flags(s, "align"))
            variant("freeze", method_flags(s, "freeze"))
    return out


ENTRIES = {"table1": table1_entries, "fewshot": fewshot_entries, "ablations": ablation_entries}


def cache_dir(s: Settings, spec: CacheSpec) -> Path:
    name = (f"{spec.suite}-{s.preset}-m{spec.raw_layer or 'default'}-M{spec.aq_layer or 'default'}-"
            f"{spec.anchor_type}-aug{s.image_aug}") + (f"-s{spec.seed}" if spec.seed is not None else "")
    return s.cache_root / name


# ---------------------------------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------------------------------
def _model_flags(s: Settings) -> list[str]:
    flags = ["--vlm_path", s.vlm_path] if s.vlm_path else []
    return flags + (["--config_file_path", s.config_file_path] if s.config_file_path else [])


def train_command(s: Settings, e: Entry, resume_step: int | None) -> list[str]:
    if s.num_gpus > 1:
        cmd = [s.torchrun, "--standalone", "--nnodes", "1", "--nproc_per_node", str(s.num_gpus),
               "vla-scripts/finetune.py"]
    else:
        cmd = [s.python, "vla-scripts/finetune.py"]
    if resume_step is not None:  # the same flags as the original run, which the resume guards check
        chkpt = s.run_root / f"{e.run_id}--{resume_step}_chkpt"
        cmd += (["--vlm_path", s.vlm_path] if s.vlm_path else []) + [
            "--config_file_path", str(chkpt), "--resume", "True", "--resume_step", str(resume_step)]
    else:
        cmd += _model_flags(s)
    warmup, decay = schedule(e.steps, s.lr_schedule, s.warmup_percent, s.decay_percent)
    r = s.recipes[e.suite]
    cmd += ["--model_preset", s.preset, "--data_root_dir", s.data_root, "--dataset_name", f"{e.suite}_no_noops",
            "--run_root_dir", str(s.run_root), "--run_id", e.run_id, "--run_id_note", e.note,
            "--batch_size", str(s.batch_size), "--learning_rate", s.lr,
            "--lr_warmup_steps", str(warmup), "--num_steps_before_decay", str(decay),
            "--grad_accumulation_steps", str(s.grad_accum), "--max_steps", str(e.steps),
            "--save_freq", str(s.save_freq), "--save_latest_checkpoint_only", s.save_latest_only,
            "--image_aug", s.image_aug, "--use_lora", str(r["use_lora"]), "--lora_rank", str(s.lora_rank),
            "--use_proprio", str(r["use_proprio"]), "--num_images_in_input", str(r["num_images_in_input"]),
            "--use_pro_version", str(r["use_pro_version"]),
            "--use_l1_regression", "True", "--seed", str(e.seed), "--wandb_project", s.wandb_project,
            "--wandb_mode", s.wandb_mode, "--retention_monitor", "True",
            "--retention_monitor_freq", str(s.monitor_freq)]
    if s.wandb_entity:
        cmd += ["--wandb_entity", s.wandb_entity]
    if s.num_workers:
        cmd += ["--num_workers", s.num_workers]
    return cmd + e.flags


def cache_command(s: Settings, spec: CacheSpec, seed: int) -> list[str]:
    cmd = [s.python, "vla-scripts/build_craft_cache.py", "--cache_dir", str(cache_dir(s, spec)), *_model_flags(s),
           "--model_preset", s.preset, "--seed", str(spec.seed if spec.seed is not None else seed),
           "--data_root_dir", s.data_root, "--dataset_name", f"{spec.suite}_no_noops",
           "--num_images_in_input", "2", "--use_proprio", "True", "--use_pro_version", "True",
           "--image_aug", s.image_aug]
    if spec.raw_layer:
        cmd += ["--craft_raw_layer", spec.raw_layer]
    if spec.aq_layer:
        cmd += ["--craft_aq_layer", spec.aq_layer]
    return cmd + ["--craft_anchor_type", spec.anchor_type]


def drift_command(s: Settings, e: Entry) -> list[str]:
    cmd = [s.python, "vla-scripts/measure_drift.py", "--reference_path", s.theta0,
           "--finetuned_path", str(final_checkpoint(s.run_root, e.run_id, e.steps)),
           "--data_root_dir", s.data_root, "--dataset_name", f"{e.suite}_no_noops",
           "--output_dir", str(s.run_root / e.run_id / DRIFT_REPORT.parent),
           "--num_samples", str(s.drift_samples), "--seed", str(s.eval_seed), "--center_crop", s.image_aug]
    if s.vlm_path and s.config_file_path:  # θ0 is the VLM, its tokenizer lives in the config folder
        cmd[cmd.index(s.theta0)] = s.vlm_path
        cmd += ["--tokenizer_path", s.config_file_path]
    return cmd


def eval_command(s: Settings, e: Entry, step: int | None = None) -> list[str]:
    """The evaluation of the final checkpoint, or of the checkpoint of `step` (into eval_steps/<step>/)."""
    checkpoint = final_checkpoint(s.run_root, e.run_id, step if step is not None else e.steps)
    out_dir = (s.run_root / e.run_id / EVAL_SUMMARY.parent if step is None
               else step_eval_summary(s.run_root, e.run_id, step).parent)
    # the center crop matches training: a policy trained with random crops is evaluated on the center crop
    return [s.python, "LIBERO/run_libero_eval.py",
            "--pretrained_checkpoint", str(checkpoint),
            "--task_suite_name", e.suite, "--num_trials_per_task", str(s.eval_trials), "--seed", str(s.eval_seed),
            "--local_log_dir", str(out_dir), "--num_images_in_input", "2",
            "--use_proprio", "True", "--center_crop", s.image_aug, "--device", s.eval_device,
            "--num_envs", str(s.num_envs),
            # wandb (online, or offline for `wandb sync`): the eval joins the training run's project and group and
            # names it (train_run_id), so the parser joins its success rate; summary.json holds it in any case
            *(["--use_wandb", "True"] if s.wandb_mode != "disabled" else []), *s.eval_extra]


def earlier_eval_steps(s: Settings, steps: int) -> list[int]:
    """Steps of the every-k-th saved checkpoints before the final one (EVAL_EVERY_KTH_CHECKPOINT; none when 0)."""
    if s.eval_every_kth <= 0:
        return []
    every = s.eval_every_kth * s.save_freq
    return list(range(every, steps, every))


# ---------------------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------------------
class CommandFailed(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


FAILURE_TAIL_LINES = 30


class Runner:
    def __init__(self, s: Settings, progress: Progress | None = None) -> None:
        self.s = s
        self.counts = {"train": 0, "eval": 0, "cache": 0, "drift": 0, "skip": 0}
        self.built_caches: set[Path] = set()
        self.progress = progress
        self.echo = _on("GRID_ECHO")

    def note(self, text: str) -> None:
        print(f"# {text}", flush=True)

    def loud(self, text: str) -> None:
        bar = "!" * 96
        print(f"{bar}\n!!! {text}\n{bar}", file=sys.stderr, flush=True)

    def run(self, kind: str, log: Path, cmd: list[str]) -> None:
        """Print the command, run it with its output (simulator, wandb and progress-bar noise) in its own log file
        only (GRID_ECHO=1 shows it too); on failure the log's tail, the log and the command."""
        print(("[DRY_RUN]" if self.s.dry_run else "") + f"[{kind}] " + shlex.join(cmd), flush=True)
        self.counts[kind] += 1
        if self.s.dry_run:
            return
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        tail: deque[str] = deque(maxlen=FAILURE_TAIL_LINES)
        with open(log, "a") as f:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "WANDB_MODE": self.s.wandb_mode})
            assert proc.stdout is not None
            for line in proc.stdout:
                if self.echo:
                    sys.stdout.write(line)
                f.write(line)
                tail.append(line)
            code = proc.wait()
        sys.stdout.flush()
        if self.progress is not None:
            self.progress.step(kind, time.monotonic() - start)
        if code != 0:
            print("".join(f"  | {line}" for line in tail), end="", file=sys.stderr)
            print(f"FAILED (exit {code}) [{kind}]; log: {log}\nfailing command: {shlex.join(cmd)}", file=sys.stderr)
            raise CommandFailed(code)

    def move_aside(self, path: Path) -> None:
        target = path.with_name(f"{path.name}.partial-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
        if self.s.dry_run:
            self.note(f"would move '{path}' to '{target}'")
        else:
            path.rename(target)
            self.note(f"moved '{path}' to '{target}'")

    def latest_checkpoint(self, run_id: str, steps: int) -> int | None:
        best = None
        for d in self.s.run_root.glob(f"{glob_escape(run_id)}--*_chkpt"):
            m = re.fullmatch(re.escape(run_id) + r"--(\d+)_chkpt", d.name)
            if m and (d / COMPLETE_MARKER).is_file() and int(m.group(1)) < steps:
                best = max(best or 0, int(m.group(1)))
        return best

    def cache(self, e: Entry) -> None:
        path = cache_dir(self.s, e.cache)
        if path in self.built_caches or (path / "manifest.json").is_file():
            if path not in self.built_caches:
                self.note(f"[skip-cache] {path} exists")
                self.counts["skip"] += 1
            self.built_caches.add(path)
            return
        self.run("cache", self.s.run_root / "logs" / f"cache-{path.name}.log", cache_command(self.s, e.cache, e.seed))
        self.built_caches.add(path)

    def train(self, e: Entry) -> None:
        final = final_checkpoint(self.s.run_root, e.run_id, e.steps)
        if (final / COMPLETE_MARKER).is_file():
            self.note(f"[skip-train] {e.run_id}: final checkpoint complete ({final})")
            self.counts["skip"] += 1
            return
        resume = self.latest_checkpoint(e.run_id, e.steps) if self.s.auto_resume else None
        if resume is not None:
            self.note(f"[resume] {e.run_id} from step {resume}")
        elif (self.s.run_root / e.run_id).exists():  # no complete checkpoint: a partial metrics file, start afresh
            self.move_aside(self.s.run_root / e.run_id)
        self.run("train", self.s.run_root / "logs" / f"{e.run_id}.train.log", train_command(self.s, e, resume))
        if not self.s.dry_run and not (final / COMPLETE_MARKER).is_file():
            raise fail(f"training of {e.run_id} exited 0 but left no complete final checkpoint '{final}'",
                       "stopped by SIGTERM/SIGINT? rerun the script to resume")

    def drift(self, e: Entry) -> None:
        if not self.s.drift:
            return
        if not self.s.theta0:
            self.note(f"[skip-drift] {e.run_id}: no θ0 folder (tiny model from scratch); set SMOKE_VLM_PATH")
            return
        final = final_checkpoint(self.s.run_root, e.run_id, e.steps)
        report_path = self.s.run_root / e.run_id / DRIFT_REPORT
        report = read_json(report_path)
        if report is not None and self.kept("drift", e.run_id, report_path, drift_stale_reason(report, final)):
            return
        self.run("drift", self.s.run_root / "logs" / f"{e.run_id}.drift.log", drift_command(self.s, e))

    def kept(self, kind: str, who: str, result: Path, stale: str | None) -> bool:
        """A result found on disk: kept (noted, counted as a skip) when it is of the final weights (`stale` is None),
        else moved aside so that it is made again."""
        if stale is None:
            self.note(f"[skip-{kind}] {who}: {result} is current")
            self.counts["skip"] += 1
            return True
        self.note(f"[stale-{kind}] {who}: {stale}; {'measuring' if kind == 'drift' else 'evaluating'} again")
        self.move_aside(result.parent)
        return False

    def evaluate(self, e: Entry) -> None:
        if self.s.skip_eval:
            self.loud(f"SMOKE_SKIP_EVAL=1: evaluation of {e.run_id} SKIPPED")
            return
        final = final_checkpoint(self.s.run_root, e.run_id, e.steps)
        eval_dir = self.s.run_root / e.run_id / EVAL_SUMMARY.parent
        summary = read_json(self.s.run_root / e.run_id / EVAL_SUMMARY)
        if summary is not None:
            if self.kept("eval", e.run_id, eval_dir / "summary.json", stale_reason(summary, final)):
                return
        elif eval_dir.exists():  # interrupted: run_libero_eval.py resumes from episodes.jsonl (same settings only)
            self.note(f"[resume-eval] {e.run_id}: {eval_dir} exists without summary.json")
        self.run("eval", self.s.run_root / "logs" / f"{e.run_id}.eval.log", eval_command(self.s, e))
        if not self.s.dry_run and read_json(self.s.run_root / e.run_id / EVAL_SUMMARY) is None:
            raise fail(f"evaluation of {e.run_id} exited 0 but wrote no {eval_dir / 'summary.json'}",
                       f"see {self.s.run_root / 'logs' / (e.run_id + '.eval.log')}")

    def evaluate_earlier(self, e: Entry) -> None:
        """EVAL_EVERY_KTH_CHECKPOINT: every k-th saved checkpoint before the final one, into eval_steps/<step>/."""
        if self.s.skip_eval:
            return
        for step in earlier_eval_steps(self.s, e.steps):
            checkpoint = final_checkpoint(self.s.run_root, e.run_id, step)
            path = step_eval_summary(self.s.run_root, e.run_id, step)
            summary = read_json(path)
            if summary is not None and self.kept("eval", f"{e.run_id} step {step}", path,
                                                 stale_reason(summary, checkpoint)):
                continue
            if not self.s.dry_run and not (checkpoint / COMPLETE_MARKER).is_file():
                raise fail(f"EVAL_EVERY_KTH_CHECKPOINT: {e.run_id} has no complete checkpoint of step {step} "
                           f"('{checkpoint}')", "it was trained with SAVE_LATEST_CHECKPOINT_ONLY=True; retrain it or "
                           "unset EVAL_EVERY_KTH_CHECKPOINT")
            self.run("eval", self.s.run_root / "logs" / f"{e.run_id}.eval-{step}.log", eval_command(self.s, e, step))

    def entry(self, e: Entry) -> None:
        if e.cache is not None:
            self.cache(e)
        self.train(e)
        self.drift(e)
        self.evaluate(e)
        self.evaluate_earlier(e)


def result_of(s: Settings, e: Entry) -> str:
    """` | success 7/10 (70.0%)` from the run's evaluation summary, when there is one."""
    summary = read_json(s.run_root / e.run_id / EVAL_SUMMARY)
    if not summary or not isinstance(summary.get("num_episodes"), int) or not summary["num_episodes"]:
        return ""
    return (f" | success {summary.get('num_successes')}/{summary['num_episodes']} "
            f"({100.0 * float(summary.get('success_rate', 0.0)):.1f}%)")


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def wandb_login_problem() -> str | None:
    """Why online wandb would fail for lack of a login (None: it would not), asked of wandb itself without network
    and without a terminal to prompt on, before any run starts."""
    probe = "import wandb\ntry:\n    wandb.login(verify=False)\nexcept wandb.errors.UsageError as e:\n    print(e)"
    proc = subprocess.run([sys.executable, "-c", probe], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        return f"wandb could not be asked about a login ({proc.stderr.strip().splitlines()[-1:]})"
    return proc.stdout.strip() or None


def banner(s: Settings, entries: list[Entry]) -> None:
    """What the grid will do, the recipe with its sources, every departure from it and the cost: before anything."""
    print(f"# ==== CRaFT experiments: {s.experiment} ====")
    print(f"# mode: {'DRY_RUN ' if s.dry_run else ''}{'SMOKE (tiny preset)' if s.smoke else 'full'}")
    print(f"# working directory: {REPO_ROOT}\n# run root: {s.run_root}")
    print(f"# data: {s.data_root} | θ0: {s.theta0 or '<none: tiny model from scratch>'} | preset: {s.preset} | "
          f"GPUs: {s.num_gpus}")
    print(f"# suites: {' '.join(s.suites)} | seeds: {' '.join(map(str, s.seeds))} | {len(entries)} run(s)")
    warmup, decay = ("none", "none") if s.lr_schedule == "upstream" else (f"{s.warmup_percent}% of the steps",
                                                                          f"x0.1 at {s.decay_percent}%")
    print(f"# training: global batch {s.global_batch} = BATCH_SIZE {s.batch_size} x NUM_GPUS {s.num_gpus} x "
          f"accumulation {s.grad_accum} | lr {s.lr} | LoRA rank {s.lora_rank} | warm-up {warmup} | decay {decay} | "
          f"image aug {s.image_aug} | save every {s.save_freq}")
    steps: dict[tuple[str, int | None], int] = {}
    for e in entries:
        steps.setdefault((e.suite, e.shots), e.steps)
    print("# steps: " + ", ".join(f"{suite}{f' {k}-shot' if k is not None else ''} {n}"
                                  for (suite, k), n in steps.items()))
    if not s.smoke:
        for line in recipe_lines(s.recipes):
            print(f"# {line}")
    departures = list(s.departures) + [d for (suite, k), n in steps.items()
                                       if (d := steps_departure(s, suite, k, n)) is not None]
    if departures:
        for d in departures:
            print(f"# DEPARTS FROM THE RECIPE: {d}")
    else:
        print("# departures from the recipe: none")
    if not s.smoke:
        hours = sum(gpu_hours(s.recipes[e.suite], e.steps, s.global_batch, "--use_craft" in e.flags
                              and e.flags[e.flags.index("--use_craft") + 1] == "True") for e in entries)
        disk = sum(disk_gb(s.recipes[e.suite], e.steps, s.save_freq, s.save_latest_only == "True") for e in entries)
        print(f"# cost: ~{hours:,.0f} H100 GPU-hours for training (upstream's 4xH100 wall-clock per suite x 4 GPUs, "
              f"scaled by the samples seen; CRaFT runs x{CRAFT_TIME_FACTOR}), evaluation extra | disk ~{disk:,.0f} GB "
              "of checkpoints")
    print(f"# wandb: project {s.wandb_project} entity {s.wandb_entity or '<default>'} mode {s.wandb_mode}")
    extra = (f", every {s.eval_every_kth}th saved checkpoint is evaluated too (a separate best-checkpoint column)"
             if s.eval_every_kth else "")
    print(f"# evaluation: {s.eval_trials} trial(s)/task on {s.eval_device}, {s.num_envs} simulator process(es); "
          f"the tables report the final checkpoint{extra}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in EXPERIMENTS:
        print(f"error: usage grid.py {{{'|'.join(EXPERIMENTS)}}} — run one of the craft_experiments/*/run_*.sh "
              "scripts", file=sys.stderr)
        return 2
    try:
        s = load_settings(argv[0], Path(os.environ.get("GRID_INVOKE_DIR", os.getcwd())))
        entries = ENTRIES[s.experiment](s)
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if s.wandb_mode == "online" and not s.dry_run:
        problem = wandb_login_problem()
        if problem:
            print(f"error: WANDB_MODE=online but {problem} — run `wandb login` (or set WANDB_API_KEY), or unset "
                  "WANDB_MODE to log offline and upload later with `wandb sync`", file=sys.stderr)
            return 2
    banner(s, entries)
    if s.skip_eval:
        Runner(s).loud("SMOKE_SKIP_EVAL=1: EVALUATION IS SKIPPED for every run (no LIBERO simulator). Training only.")
    progress = Progress(len(entries))
    runner = Runner(s, progress)
    suite = None
    try:
        for e in entries:
            if e.suite != suite:
                suite = e.suite
                runner.note(f"suite {suite}: {e.steps} steps")
            runner.note(f"{progress.begin_run()} {e.run_id}")
            runner.entry(e)
            if not s.dry_run:
                runner.note(f"{progress.tag} done {e.run_id}: {progress.end_run()}{result_of(s, e)}")
    except CommandFailed as exc:
        return exc.code
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    c = runner.counts
    if not s.dry_run:
        print(f"# total time {duration(time.monotonic() - progress.started)}")
    print(f"# ==== {s.experiment} done: {c['train']} training(s), {c['drift']} drift measure(s), {c['eval']} "
          f"evaluation(s), {c['cache']} cache build(s) {'printed' if s.dry_run else 'run'}, {c['skip']} skipped as "
          "finished ====")
    if s.skip_eval:
        runner.loud("SMOKE_SKIP_EVAL=1 was set: NO evaluation was run.")
    if not s.dry_run:
        print(f"# aggregate with: {s.python} craft_experiments/common_utils/log_parser.py --runs_dir {s.run_root} "
              f"--output_dir {s.output_root / 'results' / s.experiment} --generate_latex_table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
