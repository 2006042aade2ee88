"""Configuration of `vla-scripts/finetune.py`: one dataclass (upstream flag names) and its start-up validation.

Flag meanings follow upstream VLA-Adapter; the additions (`seed`, `wandb_mode`, `num_demos_per_task`,
`max_consecutive_nonfinite`, `run_id`, the `craft_*` flags, `merge_lora_during_training`) are documented inline.
`validate_config` is called before anything is built or written, so a bad flag fails in a second, not after the
model has loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from prismatic.cli_errors import UserError
from prismatic.training.checkpoint_names import (  # noqa: F401 - re-exported (callers import them from here)
    CHECKPOINT_DIR_PATTERN,
    COMPLETE_MARKER,
    TRAINING_STATE_FILE,
    parse_checkpoint_dir,
)

PRESETS = ("real", "tiny")
WANDB_MODES = ("online", "offline", "disabled")
CRAFT_ANCHOR_TYPES = ("concat", "raw_only", "aq_only")
CRAFT_ANCHOR_SOURCES = ("online", "offline")
CRAFT_DUAL_MODES = ("gradient", "pid", "nupi")
CRAFT_ADAM_SECOND_MOMENTS = ("combined", "action")
CRAFT_REUSE = ("gradient", "coefficient")  # --craft_reuse: what a step between g_ret refreshes reuses
RETENTION_METHODS = ("none", "craft", "align", "consft", "ki")


# what a folder given as --config_file_path / --vlm_path holds at least one of (policy, upstream, Prismatic, HF,
# or the tokenizer a --vlm_path run takes from --config_file_path)
MODEL_FOLDER_FILES = ("config.json", "policy_config.json", "action_head--*_checkpoint.pt", "checkpoints/*.pt",
                      "tokenizer.json", "tokenizer_config.json")


class ConfigError(UserError, ValueError):
    """A flag (or a combination of flags) that cannot work; the message lists every problem found."""


@dataclass
class FinetuneConfig:
    # fmt: off
    # ---- model -----------------------------------------------------------------------------------------------
    config_file_path: Path | None = None    # policy dir to start from; resume: the `<run id>--<step>_chkpt` dir
    vlm_path: Path | None = None            # base VLM: Prismatic native checkpoint dir or a policy folder
    model_preset: str = "real"              # "real" | "tiny": sizes when building from a native VLM or from scratch

    # ---- data ------------------------------------------------------------------------------------------------
    data_root_dir: Path = Path("datasets/rlds")  # folder holding `{dataset_name}/1.0.0/`
    dataset_name: str = "libero_spatial_no_noops"
    run_root_dir: Path = Path("runs")       # run dirs and checkpoints go here
    num_demos_per_task: int | None = None   # few-shot: keep this many episodes per task (None = all)
    num_workers: int = 0                    # data-loading worker processes per rank
    image_aug: bool = True                  # random crop + colour jitter (eval then uses a center crop)
    use_val_set: bool = False               # hold out a validation split and evaluate it every `val_freq` steps
    val_freq: int = 10_000

    # ---- optimisation ----------------------------------------------------------------------------------------
    batch_size: int = 8                     # per-rank micro-batch size
    grad_accumulation_steps: int = 1        # global batch = batch_size * world_size * grad_accumulation_steps
    learning_rate: float = 5e-4
    lr_warmup_steps: int = 0                # linear warm-up from 0.1 * lr to lr over this many steps
    num_steps_before_decay: int = 100_000   # lr x 0.1 from this step on (MultiStepLR)
    max_steps: int = 200_000
    seed: int = 7
    max_consecutive_nonfinite: int = 10     # stop after this many consecutive non-finite losses (each one is skipped)

    # ---- architecture / head ---------------------------------------------------------------------------------
    use_l1_regression: bool = True          # the only supported head (L1 regression on normalised actions)
    use_proprio: bool = True
    num_images_in_input: int = 2            # third-person (+ wrist)
    use_pro_version: bool = True            # Pro bridge-attention blocks

    # ---- LoRA ------------------------------------------------------------------------------------------------
    use_lora: bool = True
    lora_rank: int = 64                     # alpha = 2 * rank
    lora_dropout: float = 0.0
    merge_lora_during_training: bool = True  # checkpoints also hold the merged policy (eval-ready); adapter kept too
    freeze_vision_backbone: bool = False    # "Freeze" baseline: no update (nor LoRA) in the two ViTs

    # ---- checkpoints / resume --------------------------------------------------------------------------------
    save_freq: int = 10_000
    save_latest_checkpoint_only: bool = False  # delete older checkpoints of this run after each successful save
    resume: bool = False
    resume_step: int | None = None

    # ---- logging ---------------------------------------------------------------------------------------------
    wandb_entity: str | None = None
    wandb_project: str = "vla-adapter"
    wandb_mode: str = "offline"             # online | offline | disabled
    run_id_note: str | None = None
    run_id: str | None = None               # override the generated run id

    # ---- CRaFT (logic lives in prismatic/training/craft_utils.py; see docs/CRAFT.md) ------------------------
    use_craft: bool = False
    craft_retention_budget: float = 0.1     # epsilon
    craft_dual_lr: float = 0.01             # eta_lambda
    craft_enable_projection: bool = True    # conflict-aware projection of g_act
    craft_enable_dual: bool = True          # adaptive lambda (off: lambda fixed at craft_fixed_lambda / init)
    craft_fixed_lambda: float | None = None
    craft_init_lambda: float = 0.0
    craft_raw_layer: int | None = None      # layer m of the Raw-latent anchor (None: L // 2)
    craft_aq_layer: int | None = None       # layer M of the ActionQuery anchor (None: L)
    craft_anchor_type: str = "concat"       # concat | raw_only | aq_only
    craft_anchor_source: str = "online"     # online (snapshot forward) | offline (cache)
    craft_cache_dir: Path | None = None
    craft_delta: float = 1e-8
    craft_snapshot_path: Path | None = None  # theta_0 for the anchors (None: the model as loaded)

    # ---- CRaFT dual dynamics and training diagnostics (issue 15; docs/CRAFT.md "Dual modes") -----------------
    craft_dual_mode: str = "gradient"       # gradient (lambda += eta*e, the paper's rule) | pid (Stooke et al. 2020)
    #                                         | nupi (Sohrabi et al. 2024)
    craft_dual_kp: float = 0.0              # pid / nupi: proportional gain (ki is --craft_dual_lr)
    craft_dual_kd: float = 0.0              # pid: derivative gain (on the positive part of the error's rise)
    craft_dual_normalize: bool = False      # error e = L_ret/eps - 1 instead of L_ret - eps
    craft_dual_nu: float = 0.0              # nupi: EMA coefficient of the error in the proportional term, [0, 1)
    craft_dual_log_error: bool = False      # error e = ln(L_ret/eps) (floored at ln 1e-3) instead of L_ret - eps
    craft_dual_setpoint: float = 1.0        # the controller aims at setpoint * eps, in (0, 1] (a noise margin)
    craft_max_lambda: float | None = None   # optional cap on lambda (and on the pid integral)
    craft_adam_second_moment: str = "combined"  # combined (torch AdamW on g) | action: AdamW's v sees only the
    #                                         action part g - lambda g_ret (split_moment_adamw.py; issue 26)
    craft_retention_every: int = 1          # g_ret (and online θ0's forward) every k steps, reused between (1: exact)
    craft_reuse: str = "gradient"           # k > 1, steps in between: gradient (the kept g_ret) | coefficient (ONE
    #                                         backward of L_act + (lambda - c_last) L_ret, fresh gradients)
    log_update_norms: bool = False          # per-group ||update|| and AdamW sqrt(v) (update_norms.py)

    # ---- related-work baselines (docs/BASELINES.md) -----------------------------------------------------------
    retention_method: str = "none"          # none | craft | align | consft | ki (--use_craft True is craft)
    align_weight: float = 0.2               # w in L_act + w * L_align
    align_layer: int | None = None          # LLM layer of the aligned vision-token states (None: L // 2)
    align_teacher: str = "self"             # "self" (theta_0 vision backbone) or a timm model id
    consft_tau: float = 0.1                 # confidence temperature, in per-sample L1 units (> 0)
    consft_clip: float = 0.2                # trust region rho of the per-sample weights, in [0, 1)
    ki_action_loss_weight: float = 1.0      # ki: w in L_act(sg(features)) + w * CE(action tokens); 0 = VLA stays
                                            # at theta_0 (pure stop-gradient ablation)

    # ---- drift monitor (prismatic/training/retention_monitor.py) ----------------------------------------------
    retention_monitor: bool = False         # log CRaFT's L_ret against theta_0 (no gradient) for any method
    retention_monitor_freq: int = 100       # every this many optimizer steps (and at the last step)
    # ---- precision (issue 16) ------------------------------------------------------------------------------------
    dtype: str = "auto"                     # auto: bf16 autocast on CUDA, fp32 on CPU | bfloat16: bf16 autocast on
                                            # CPU too (fp32 master weights; tests) | float32: no autocast anywhere
    distributed_strategy: str = "ddp"       # ddp | fsdp (FSDP2: shards per decoder layer / ViT block; torchrun)
    # ---- run safety (docs/EXPERIMENTS_AND_TRAINING.md, "Failure and recovery") ------------------------------
    overwrite: bool = False                 # a fresh run may replace (delete) an existing run of this id
    allow_fewer_demos: bool = False         # --num_demos_per_task N with fewer demos for a task: keep them all
    # fmt: on

    @property
    def lora_alpha(self) -> int:
        return 2 * self.lora_rank


def global_batch_size(cfg: FinetuneConfig, world_size: int) -> int:
    return cfg.batch_size * world_size * cfg.grad_accumulation_steps


def make_run_id(cfg: FinetuneConfig, world_size: int) -> str:
    """Upstream-style run id `{model}+{dataset}+b{global batch}+lr-{lr}[+lora-r{r}+dropout-{p}][--image_aug][--note]`"""
    if cfg.run_id:
        return cfg.run_id
    source = cfg.config_file_path or cfg.vlm_path
    model = Path(source).name if source else f"scratch-{cfg.model_preset}"
    run_id = f"{model}+{cfg.dataset_name}+b{global_batch_size(cfg, world_size)}+lr-{cfg.learning_rate}"
    run_id += f"+seed-{cfg.seed}"  # two seeds of one recipe are two runs, never one folder
    if cfg.use_lora:
        run_id += f"+lora-r{cfg.lora_rank}+dropout-{cfg.lora_dropout}"
    if cfg.use_craft:
        run_id += f"+craft-eps{cfg.craft_retention_budget}"
        if cfg.craft_retention_every != 1:  # the cheaper step is another run (the exact step's id is unchanged)
            run_id += f"+ret-every{cfg.craft_retention_every}"
            if cfg.craft_reuse == "coefficient":
                run_id += "-coef"
    elif cfg.retention_method in ("align", "consft"):
        run_id += f"+{cfg.retention_method}"
    elif cfg.retention_method == "ki":  # the weight is in the id: the w = 0 ablation is another run
        run_id += f"+ki-w{cfg.ki_action_loss_weight:g}"
    if cfg.image_aug:
        run_id += "--image_aug"
    if cfg.run_id_note:
        run_id += f"--{cfg.run_id_note}"
    return run_id


STRATEGIES = ("ddp", "fsdp")


def _strategy_errors(cfg: FinetuneConfig) -> list[str]:
    if cfg.distributed_strategy not in STRATEGIES:
        return [f"--distributed_strategy must be one of {STRATEGIES}, got '{cfg.distributed_strategy}'"]
    if cfg.distributed_strategy != "fsdp":
        return []
    # these run their own θ0 forwards or per-tensor bookkeeping outside the root module: not ported to shards
    unsupported = [flag for flag, on in (("--retention_monitor True", cfg.retention_monitor),
                                         ("--log_update_norms True", cfg.log_update_norms),
                                         (f"--retention_method {cfg.retention_method}",
                                          cfg.retention_method in ("align", "consft"))) if on]
    return [f"{flag} is not supported with --distributed_strategy fsdp; drop it or use --distributed_strategy ddp"
            for flag in unsupported]


def validate_config(cfg: FinetuneConfig) -> list[str]:
    """Check every flag before anything is built. Raises ConfigError listing all problems; returns warnings."""
    errors: list[str] = []
    warnings: list[str] = []

    def positive(name: str, allow_zero: bool = False) -> None:
        value = getattr(cfg, name)
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
        if not ok:
            errors.append(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

    for name in ("batch_size", "grad_accumulation_steps", "learning_rate", "max_steps", "save_freq",
                 "num_steps_before_decay", "num_images_in_input", "max_consecutive_nonfinite"):
        positive(name)
    for name in ("lr_warmup_steps", "num_workers"):
        positive(name, allow_zero=True)
    errors.extend(_run_safety_errors(cfg))
    if cfg.use_val_set:
        positive("val_freq")
    if cfg.retention_monitor:
        positive("retention_monitor_freq")
    if cfg.use_lora:
        positive("lora_rank")
        if not 0.0 <= cfg.lora_dropout < 1.0:
            errors.append(f"--lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.num_demos_per_task is not None and cfg.num_demos_per_task <= 0:
        errors.append(f"--num_demos_per_task must be > 0 (or unset for all demos), got {cfg.num_demos_per_task}")
    if cfg.model_preset not in PRESETS:
        errors.append(f"--model_preset must be one of {PRESETS}, got '{cfg.model_preset}'")
    if cfg.wandb_mode not in WANDB_MODES:
        errors.append(f"--wandb_mode must be one of {WANDB_MODES}, got '{cfg.wandb_mode}'")
    if not cfg.use_l1_regression:
        errors.append("--use_l1_regression False is not supported: this project implements only the L1 regression "
                      "action head (upstream's discrete-token and diffusion heads are not ported); pass "
                      "--use_l1_regression True")

    data_dir = Path(cfg.data_root_dir)
    if not data_dir.is_dir():
        errors.append(f"--data_root_dir '{data_dir}' does not exist or is not a directory")
    else:
        errors.extend(_dataset_errors(data_dir, cfg.dataset_name))
    model_folders = ("vlm_path",) if cfg.resume else ("config_file_path", "vlm_path")  # a resume's: _resume_errors
    for name in ("config_file_path", "vlm_path", "craft_snapshot_path"):
        value = getattr(cfg, name)
        if value is not None and not Path(value).exists():
            errors.append(f"--{name} '{value}' does not exist")
        elif name in model_folders and value is not None and Path(value).is_dir() \
                and not any(next(Path(value).glob(pattern), None) for pattern in MODEL_FOLDER_FILES):
            errors.append(f"--{name} '{value}' holds no model (none of {', '.join(MODEL_FOLDER_FILES)})")

    if cfg.resume:
        errors.extend(_resume_errors(cfg))
    elif cfg.resume_step is not None:
        warnings.append(f"--resume_step {cfg.resume_step} is ignored because --resume is False")

    errors.extend(_retention_method_errors(cfg))
    if cfg.craft_adam_second_moment not in CRAFT_ADAM_SECOND_MOMENTS:
        errors.append(f"--craft_adam_second_moment must be one of {CRAFT_ADAM_SECOND_MOMENTS}, got "
                      f"'{cfg.craft_adam_second_moment}'")
    elif cfg.craft_adam_second_moment != "combined" and not cfg.use_craft:
        errors.append(f"--craft_adam_second_moment {cfg.craft_adam_second_moment} needs --use_craft True (only "
                      "CRaFT's gradient has an action part)")
    from prismatic.training.train_step import AUTOCAST_DTYPES  # precision (issue 16)

    if cfg.dtype not in AUTOCAST_DTYPES:
        errors.append(f"--dtype must be one of {AUTOCAST_DTYPES}, got '{cfg.dtype}'")
    if cfg.use_craft:
        errors.extend(_craft_errors(cfg, warnings))
    errors.extend(_craft_retention_every_errors(cfg))
    errors.extend(_strategy_errors(cfg))
    if errors:
        raise ConfigError("invalid fine-tuning configuration:\n  - " + "\n  - ".join(errors))
    return warnings


def _retention_method_errors(cfg: FinetuneConfig) -> list[str]:
    """--retention_method and --use_craft name one method; resolves them in place (craft <=> use_craft True) so the
    saved config.yaml states the method both ways."""
    method = cfg.retention_method
    if method not in RETENTION_METHODS:
        return [f"--retention_method must be one of {RETENTION_METHODS}, got '{method}'"]
    if cfg.use_craft and method not in ("none", "craft"):
        return [f"--use_craft True conflicts with --retention_method {method}: pick one method (--use_craft True is "
                "--retention_method craft)"]
    if method == "craft" or cfg.use_craft:
        cfg.use_craft, cfg.retention_method = True, "craft"
    errors = []
    if method == "align":
        if not (isinstance(cfg.align_weight, (int, float)) and math.isfinite(cfg.align_weight)
                and cfg.align_weight >= 0):
            errors.append(f"--align_weight must be a finite number >= 0, got {cfg.align_weight!r}")
        if cfg.align_layer is not None and cfg.align_layer < 0:
            errors.append(f"--align_layer must be >= 0 (a hidden-state index), got {cfg.align_layer}")
    if method == "ki":
        weight = cfg.ki_action_loss_weight
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            errors.append(f"--ki_action_loss_weight must be a finite number >= 0 (0: the VLA stays at theta_0), "
                          f"got {weight!r}")
    elif cfg.ki_action_loss_weight != 1.0:
        errors.append(f"--ki_action_loss_weight {cfg.ki_action_loss_weight} has no effect without "
                      "--retention_method ki; drop it or add --retention_method ki")
    if method == "consft":
        if not (math.isfinite(cfg.consft_tau) and cfg.consft_tau > 0):
            errors.append(f"--consft_tau must be > 0, got {cfg.consft_tau}")
        if not (math.isfinite(cfg.consft_clip) and 0 <= cfg.consft_clip < 1):
            errors.append(f"--consft_clip must be in [0, 1), got {cfg.consft_clip}")
    return errors


def _dataset_errors(data_dir: Path, dataset_name: str) -> list[str]:
    """Every dataset of `dataset_name` (a name, a registered mixture or "a:0.7,b:0.3") must be on disk."""
    from prismatic.data.rlds_catalog import DatasetNotFoundError, parse_dataset_spec, resolve_dataset

    try:
        names = [name for name, _ in parse_dataset_spec(dataset_name)]
    except ValueError as exc:
        return [f"--dataset_name '{dataset_name}': {exc}"]
    errors = []
    for name in names:
        try:
            resolve_dataset(data_dir, name)
        except DatasetNotFoundError as exc:
            errors.append(f"--dataset_name '{name}' under --data_root_dir '{data_dir}': {exc}")
    return errors


def _resume_errors(cfg: FinetuneConfig) -> list[str]:
    if cfg.config_file_path is None:
        return ["--resume True needs --config_file_path pointing at a '<run id>--<step>_chkpt' checkpoint folder"]
    chkpt = Path(cfg.config_file_path)
    if not chkpt.is_dir():
        return []  # already reported as missing
    errors = []
    try:
        _, dir_step = parse_checkpoint_dir(chkpt)
    except ValueError as exc:
        return [f"--resume True: {exc}"]
    if not (chkpt / COMPLETE_MARKER).is_file():
        errors.append(f"--resume True: '{chkpt}' has no {COMPLETE_MARKER} marker (an interrupted or partial save); "
                      "pick an earlier checkpoint")
    elif not (chkpt / TRAINING_STATE_FILE).is_file():
        errors.append(f"--resume True: '{chkpt}' has no {TRAINING_STATE_FILE}")
    if cfg.resume_step is None:
        errors.append(f"--resume True needs --resume_step (the folder name says {dir_step})")
    elif cfg.resume_step != dir_step:
        errors.append(f"--resume_step {cfg.resume_step} does not match the checkpoint folder '{chkpt.name}' "
                      f"(step {dir_step})")
    elif cfg.resume_step >= cfg.max_steps:
        errors.append(f"--resume_step {cfg.resume_step} >= --max_steps {cfg.max_steps}: nothing left to train")
    return errors


def _craft_retention_every_errors(cfg: FinetuneConfig) -> list[str]:
    """--craft_retention_every k: an integer >= 1, and only meaningful with CRaFT (docs/CRAFT.md, "Cheaper step")."""
    k = cfg.craft_retention_every
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        return [f"--craft_retention_every must be an integer >= 1 (1 = the exact step), got {k!r}"]
    if k != 1 and not cfg.use_craft:
        return [f"--craft_retention_every {k} needs CRaFT (--use_craft True or --retention_method craft)"]
    return _craft_reuse_errors(cfg)


def _craft_reuse_errors(cfg: FinetuneConfig) -> list[str]:
    """--craft_reuse: only meaningful between refreshes (k > 1); `coefficient` is not ported to FSDP2 shards."""
    reuse = cfg.craft_reuse
    if reuse not in CRAFT_REUSE:
        return [f"--craft_reuse must be one of {CRAFT_REUSE}, got '{reuse}'"]
    if reuse == "gradient":
        return []
    if cfg.craft_retention_every == 1:
        return [f"--craft_reuse {reuse} has no effect with --craft_retention_every 1 (every step is exact); set "
                "--craft_retention_every k > 1 or drop --craft_reuse"]
    if cfg.distributed_strategy == "fsdp":
        return [f"--craft_reuse {reuse} is not supported with --distributed_strategy fsdp (untested there); use "
                "--distributed_strategy ddp or --craft_reuse gradient"]
    if cfg.craft_adam_second_moment == "action":  # one backward gives no separate action part g_act - c g_ret
        return [f"--craft_reuse {reuse} cannot hand AdamW the action part (--craft_adam_second_moment action): its "
                "steps in between run one backward of the combined loss; use --craft_adam_second_moment combined"]
    return []


def _craft_dual_errors(cfg: FinetuneConfig) -> list[str]:
    """The dual-dynamics flags of issue 15 (kept apart from the other CRaFT checks to ease merges)."""
    errors = []
    if cfg.craft_dual_mode not in CRAFT_DUAL_MODES:
        errors.append(f"--craft_dual_mode must be one of {CRAFT_DUAL_MODES}, got '{cfg.craft_dual_mode}'")
    for name in ("craft_dual_kp", "craft_dual_kd"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            errors.append(f"--{name} must be a finite number >= 0, got {value}")
    if cfg.craft_dual_mode not in ("pid", "nupi") and cfg.craft_dual_kp:
        errors.append("--craft_dual_kp needs --craft_dual_mode pid or nupi")
    if cfg.craft_dual_mode != "pid" and cfg.craft_dual_kd:
        errors.append("--craft_dual_kd needs --craft_dual_mode pid (nupi has no derivative term)")
    if not (math.isfinite(cfg.craft_dual_nu) and 0.0 <= cfg.craft_dual_nu < 1.0):
        errors.append(f"--craft_dual_nu must be in [0, 1), got {cfg.craft_dual_nu}")
    elif cfg.craft_dual_nu and cfg.craft_dual_mode != "nupi":
        errors.append("--craft_dual_nu needs --craft_dual_mode nupi")
    if not (math.isfinite(cfg.craft_dual_setpoint) and 0.0 < cfg.craft_dual_setpoint <= 1.0):
        errors.append(f"--craft_dual_setpoint must be in (0, 1] (a fraction of epsilon), got {cfg.craft_dual_setpoint}")
    if cfg.craft_dual_log_error and cfg.craft_dual_normalize:
        errors.append("--craft_dual_log_error True and --craft_dual_normalize True are two error signals: choose one")
    elif cfg.craft_dual_log_error and not cfg.craft_retention_budget > 0:
        errors.append("--craft_dual_log_error True divides by epsilon: set --craft_retention_budget > 0")
    if cfg.craft_dual_normalize and not cfg.craft_retention_budget > 0:
        errors.append("--craft_dual_normalize True divides by epsilon: set --craft_retention_budget > 0")
    if cfg.craft_max_lambda is not None and not (math.isfinite(cfg.craft_max_lambda) and cfg.craft_max_lambda > 0):
        errors.append(f"--craft_max_lambda must be a finite number > 0, got {cfg.craft_max_lambda}")
    return errors


def _craft_errors(cfg: FinetuneConfig, warnings: list[str]) -> list[str]:
    errors = []
    if cfg.craft_anchor_type not in CRAFT_ANCHOR_TYPES:
        errors.append(f"--craft_anchor_type must be one of {CRAFT_ANCHOR_TYPES}, got '{cfg.craft_anchor_type}'")
    if cfg.craft_anchor_source not in CRAFT_ANCHOR_SOURCES:
        errors.append(f"--craft_anchor_source must be one of {CRAFT_ANCHOR_SOURCES}, got '{cfg.craft_anchor_source}'")
    if not (cfg.craft_retention_budget >= 0 and math.isfinite(cfg.craft_retention_budget)):
        errors.append(f"--craft_retention_budget (epsilon) must be >= 0 and finite, got "
                      f"{cfg.craft_retention_budget}")
    if not (cfg.craft_dual_lr >= 0 and math.isfinite(cfg.craft_dual_lr)):
        errors.append(f"--craft_dual_lr must be >= 0 and finite, got {cfg.craft_dual_lr}")
    if not (cfg.craft_delta > 0 and math.isfinite(cfg.craft_delta)):
        errors.append(f"--craft_delta must be > 0 and finite, got {cfg.craft_delta}")
    if not (cfg.craft_init_lambda >= 0 and math.isfinite(cfg.craft_init_lambda)):
        errors.append(f"--craft_init_lambda must be >= 0 and finite, got {cfg.craft_init_lambda}")
    num_layers = expected_num_llm_layers(cfg) if (cfg.craft_raw_layer, cfg.craft_aq_layer) != (None, None) else None
    for name in ("craft_raw_layer", "craft_aq_layer"):
        value = getattr(cfg, name)
        if value is not None and value < 0:
            errors.append(f"--{name} must be >= 0 (a hidden-state index), got {value}")
        elif value is not None and num_layers is not None and value > num_layers:
            errors.append(f"--{name} {value} is outside the model's hidden states 0..{num_layers} (its LLM has "
                          f"{num_layers} layers)")
    if cfg.craft_fixed_lambda is not None:
        if cfg.craft_enable_dual:
            errors.append("--craft_fixed_lambda is set but --craft_enable_dual is True: a fixed lambda needs "
                          "--craft_enable_dual False")
        elif not (cfg.craft_fixed_lambda >= 0 and math.isfinite(cfg.craft_fixed_lambda)):
            errors.append(f"--craft_fixed_lambda must be >= 0, got {cfg.craft_fixed_lambda}")
    errors.extend(_craft_dual_errors(cfg))
    if cfg.craft_anchor_source == "offline":
        if cfg.craft_cache_dir is None:
            errors.append("--craft_anchor_source offline needs --craft_cache_dir (build it with "
                          "vla-scripts/build_craft_cache.py), or use --craft_anchor_source online")
        elif not Path(cfg.craft_cache_dir).is_dir():
            errors.append(f"--craft_cache_dir '{cfg.craft_cache_dir}' does not exist")
        if cfg.image_aug:
            warnings.append("--image_aug True with --craft_anchor_source offline: the cache holds features of the "
                            "un-augmented view while training sees augmented images; the online anchor source is "
                            "the consistent choice with augmentation")
    elif cfg.craft_cache_dir is not None:
        warnings.append("--craft_cache_dir is ignored with --craft_anchor_source online")
    if not cfg.craft_enable_dual and not cfg.craft_enable_projection and (cfg.craft_fixed_lambda or 0.0) == 0.0 \
            and cfg.craft_init_lambda == 0.0:
        warnings.append("CRaFT with projection off, dual off and lambda 0 is the plain step plus a retention forward")
    return errors


# ---- run safety: checks of issue 14 (kept in one block) --------------------------------------------------------
SUPPORTED_NUM_IMAGES = (1, 2)  # third-person camera (+ wrist camera): the LIBERO RLDS datasets hold two


def _run_safety_errors(cfg: FinetuneConfig) -> list[str]:
    errors = []
    if isinstance(cfg.num_images_in_input, int) and cfg.num_images_in_input > 0 \
            and cfg.num_images_in_input not in SUPPORTED_NUM_IMAGES:
        errors.append(f"--num_images_in_input must be 1 (third-person) or 2 (+ wrist), got {cfg.num_images_in_input}")
    if not cfg.resume and cfg.model_preset == "real" and cfg.vlm_path is None and cfg.config_file_path is None:
        errors.append("--model_preset real needs --vlm_path or --config_file_path (only --model_preset tiny can be "
                      "built from scratch)")
    for name in ("run_id", "run_id_note"):
        value = getattr(cfg, name)
        if value is not None and (not str(value).strip() or "/" in str(value) or str(value) in (".", "..")):
            errors.append(f"--{name} '{value}' cannot name a folder (empty, '/', '.' or '..')")
    return errors


def expected_num_llm_layers(cfg: FinetuneConfig) -> int | None:
    """L (text_config.num_hidden_layers) of the model the run will build, read from config.json or the preset
    without building anything; None if it cannot be known yet (the extractor checks again once built)."""
    import json

    for source in (cfg.vlm_path, cfg.config_file_path):
        if source is None:
            continue
        path = Path(source) / "config.json"
        if not path.is_file():
            continue
        try:
            text = json.loads(path.read_text()).get("text_config") or {}
        except (OSError, ValueError):
            return None
        layers = text.get("num_hidden_layers") if isinstance(text, dict) else None
        return int(layers) if isinstance(layers, int) else None
    if cfg.vlm_path is None and cfg.config_file_path is None and cfg.model_preset in PRESETS:
        from prismatic.models.configuration_vla import make_vla_config

        return int(make_vla_config(cfg.model_preset).text_config.num_hidden_layers)
    return None


def validate_resume_target(cfg: FinetuneConfig) -> None:
    """--resume True: the checkpoint exists, is complete and matches --resume_step (checked before the run's
    recorded flags are merged in; everything else is checked after)."""
    errors = []
    if cfg.config_file_path is not None and not Path(cfg.config_file_path).exists():
        errors.append(f"--config_file_path '{cfg.config_file_path}' does not exist")
    else:
        errors.extend(e for e in _resume_errors(cfg) if "--max_steps" not in e)  # max_steps may be inherited
    if errors:
        raise ConfigError("cannot resume:\n  - " + "\n  - ".join(errors))


RAW_STRING_FLAGS = ("run_id", "run_id_note")  # never read as YAML (`--run_id off` is the folder "off")


def preflight_main(argv: list[str] | None = None) -> None:
    """finetune.py's first step, before its heavy imports: parse and validate the flags of a fresh run (a resumed
    run is checked after its recorded flags are merged in). Expected errors exit 2 with one line."""
    from prismatic.cli_errors import cli_entry, parse_config

    @cli_entry("finetune")
    def check(args: list[str] | None = None) -> None:
        cfg = parse_config(FinetuneConfig, args, raw_string_fields=RAW_STRING_FLAGS)
        if cfg.resume:
            validate_resume_target(cfg)
        else:
            import os

            from prismatic.training.run_folder import claim_run_folder

            validate_config(cfg)
            if not cfg.overwrite:  # refuse an existing run now; --overwrite deletes only once training starts
                claim_run_folder(Path(cfg.run_root_dir), make_run_id(cfg, int(os.environ.get("WORLD_SIZE", "1"))),
                                 overwrite=False)

    check(argv)
