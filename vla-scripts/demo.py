"""`make demo`: what CRaFT buys against plain fine-tuning, on a fresh CPU machine, in minutes.

Stages (each skipped when its output already exists, so a re-run reuses what is built):
  1. data      embedded tiny datasets in the exact LIBERO RLDS schema (synthetic scenes whose actions depend on the
               image and the instruction): a pre-training task set A (6 places; actions read the block colour) and a
               fine-tuning task set B (2 new places, "quickly"; actions ignore the colour), each with held-out
               episodes. B needs neither A's places nor the colour: fine-tuning is free to overwrite what the probe
               (stage 4) reads;
  2. theta0    the tiny VLA pre-trained on A (full fine-tuning): the snapshot whose representations CRaFT retains;
  3. finetune  LoRA on B from theta0, same seed, steps and data stream: plain, CRaFT-gradient (the paper's dual
               rule), CRaFT-pid (PID Lagrangian), CRaFT lambda-only (no projection), CRaFT-gradient with lambda
               capped (--craft_max_lambda); then two plain continuations of CRaFT-gradient's final weights (AdamW
               state inherited / fresh). Every run logs L_ret each step (CRaFT's own, or the retention monitor) and
               per-group update norms and AdamW sqrt(v);
  4. evaluate  held-out action L1 (raw action units) on B and on A, final L_ret against theta0 on B's training frames,
               steps spent above epsilon, and a linear probe fitted on theta0's pooled bridge features of A's
               training frames (labels: task = target place, block colour) applied to every model's features of A's
               held-out frames;
  5. report    two printed tables, `results.{csv,md,tex,json}`, plots (L_ret of all runs with epsilon on a log scale,
               lambda over steps, per-group update norms) and log_parser's training curves;
  6. libero    if the `libero` extra is installed: one short headless LIBERO rollout of the CRaFT policy with a
               video (the tiny policy was never trained on LIBERO: it fails the task; the run shows the loop works).

    python vla-scripts/demo.py --output_dir demo_runs            # full demo
    python vla-scripts/demo.py --output_dir /tmp/d --quick True   # reduced steps (tests)
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable as a plain script from any working directory
    sys.path.insert(0, str(REPO))

import retention_plots as rp

from finetune import train
from prismatic.cli_errors import cli_entry, parse_config
from prismatic.data.loader import make_eval_loader
from prismatic.data.normalization import unnormalize_bounds_q99
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.data.synthetic_libero import make_synthetic_libero_dataset
from prismatic.models.loaders import load_policy
from prismatic.training import checkpointing as ckpt
from prismatic.training.craft_utils import CRaFTFeatureExtractor, retention_loss
from prismatic.training.dual_presets import NEW_RULE_FLAGS
from prismatic.training.finetune_config import TRAINING_STATE_FILE, FinetuneConfig
from prismatic.training.metrics_log import read_metrics
from prismatic.training.policy_setup import RUN_CONFIG_FILE
from prismatic.training.ridge_probe import fit_ridge_probe
from prismatic.training.run_folder import config_record
from prismatic.training.update_norms import ADAM_KEY, UPDATE_KEY

PRETRAIN_SET, PRETRAIN_HELDOUT = "demo_pretrain_no_noops", "demo_pretrain_heldout_no_noops"
TARGET_SET, TARGET_HELDOUT = "demo_target_no_noops", "demo_target_heldout_no_noops"
METHOD_TITLES = {"theta0": "theta0 (before fine-tuning)", "plain": "plain fine-tuning",
                 "craft": "CRaFT-gradient", "craft_new": "CRaFT, new dual rule (warm-started PI)",
                 "craft_pid": "CRaFT-pid", "craft_lambda_only": "CRaFT lambda-only",
                 "craft_capped": "CRaFT-gradient, lambda capped",
                 "cont_inherited": "CRaFT-gradient then plain, AdamW inherited",
                 "cont_fresh": "CRaFT-gradient then plain, AdamW fresh"}
FINETUNE_RUNS = ("plain", "craft", "craft_new", "craft_pid", "craft_lambda_only", "craft_capped")
CONTINUATIONS = ("cont_inherited", "cont_fresh")
PRETRAIN_TASKS = (0, 1, 2, 3, 4, 5)  # "push the block to the <place>", 6 places; actions read the block colour
TARGET_TASKS = (14, 15)  # "quickly push the block to the bottom / left edge": new places, colour-free actions
RET_KEY, LAMBDA_KEY = "CRaFT/Retention Loss", "CRaFT/Lambda"
NORM_GROUPS = ("llm_lora", "vision_lora", "action_queries", "action_head")


@dataclass
class DemoConfig:
    # fmt: off
    output_dir: Path = Path("demo_runs")
    quick: bool = False                    # reduced steps and data (for tests); numbers are then not meaningful
    seed: int = 7
    threads: int = 2                       # torch CPU threads
    # data
    episodes_per_task: int = 4
    heldout_episodes_per_task: int = 2
    steps_per_episode: int = 20
    num_images_in_input: int = 1
    # theta0 pre-training (full fine-tuning from a random tiny VLA)
    pretrain_steps: int = 100
    pretrain_lr: float = 1e-3
    pretrain_decay_fraction: float = 0.8   # lr x0.1 after this share of the pre-training steps (> 1: never)
    # fine-tuning on the new tasks (LoRA, as upstream)
    finetune_steps: int = 60
    batch_size: int = 4
    learning_rate: float = 1e-3
    lora_rank: int = 8
    # CRaFT
    craft_retention_budget: float = 0.02   # epsilon, in units of L_ret (sum over feature dims, mean over samples)
    craft_dual_lr: float = 5.0             # eta_lambda: L_ret is small here, so lambda needs a large step to move
    pid_ki: float = 0.1                    # pid on the normalised error L_ret/eps - 1: ki = eta * eps (same I rate)
    pid_kp: float = 1.0                    # proportional gain: lambda falls as soon as L_ret drops below epsilon
    pid_kd: float = 0.5                    # derivative gain on a rising violation
    capped_max_lambda: float = 1.0         # --craft_max_lambda of the "lambda capped" row (the Adam remedy tried)
    continuation_steps: int = 20           # plain steps after CRaFT-gradient's last step (inherited / fresh AdamW)
    # evaluation
    eval_frames: int = 128                 # held-out frames per set (cap)
    probe_alpha: float = 1.0               # ridge penalty of the linear probe (standardised features)
    libero_rollout: str = "auto"           # auto (if the extra is installed) | always | never
    libero_max_steps: int = 24
    # fmt: on

    def resolved(self) -> DemoConfig:
        if not self.quick:
            return self
        return replace(self, episodes_per_task=2, heldout_episodes_per_task=1, steps_per_episode=12,
                       pretrain_steps=6, finetune_steps=4, batch_size=2, eval_frames=8, libero_max_steps=8,
                       num_images_in_input=1, continuation_steps=2)


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------
def build_data(cfg: DemoConfig, data_root: Path) -> None:
    specs = ((PRETRAIN_SET, PRETRAIN_TASKS, cfg.episodes_per_task, 1, True),
             (PRETRAIN_HELDOUT, PRETRAIN_TASKS, cfg.heldout_episodes_per_task, 2, True),
             (TARGET_SET, TARGET_TASKS, cfg.episodes_per_task, 3, False),
             (TARGET_HELDOUT, TARGET_TASKS, cfg.heldout_episodes_per_task, 4, False))
    for name, tasks, episodes, seed_offset, reads_colour in specs:
        if (data_root / name / "1.0.0" / "dataset_info.json").is_file():
            continue
        make_synthetic_libero_dataset(data_root, name, task_indices=tasks, episodes_per_task=episodes,
                                      steps=cfg.steps_per_episode, seed=cfg.seed * 100 + seed_offset,
                                      action_reads_colour=reads_colour)


def checkpoint_dir(run_root: Path, run_id: str, step: int) -> Path:
    return run_root / f"{run_id}--{step}_chkpt"


def latest_checkpoint(run_root: Path, run_id: str) -> tuple[Path, int] | None:
    """The newest complete checkpoint of `run_id` (an interrupted demo continues from it)."""
    found = []
    for path in run_root.glob(f"{run_id}--*_chkpt"):
        step = path.name[len(run_id) + 2:-len("_chkpt")]
        if step.isdigit() and (path / "COMPLETE").is_file():
            found.append((int(step), path))
    return (max(found)[1], max(found)[0]) if found else None


def run_training(ft: FinetuneConfig) -> tuple[Path, float]:
    """Train (or finish an interrupted run) unless the final checkpoint exists; returns (final checkpoint,
    seconds per step measured over the steps trained by the call that finished it)."""
    run_root = Path(ft.run_root_dir)
    final = checkpoint_dir(run_root, ft.run_id, ft.max_steps)
    timing = run_root / ft.run_id / "demo_timing.json"
    if (final / "COMPLETE").is_file() and timing.is_file():
        print(f"[demo] reusing {final}")
        return final, float(json.loads(timing.read_text())["seconds_per_step"])
    start_step = int(ft.resume_step) if ft.resume else 0
    latest = latest_checkpoint(run_root, ft.run_id)
    if latest is not None and latest[1] < ft.max_steps:
        print(f"[demo] resuming {ft.run_id} from {latest[0]}")
        start_step = latest[1]
        ft = replace(ft, resume=True, resume_step=start_step, config_file_path=latest[0])
    else:
        ft = replace(ft, overwrite=True)  # no checkpoint of the demo's own run to continue from: start it again
    start = time.perf_counter()
    result = train(ft)
    seconds = time.perf_counter() - start
    if result.stopped_by_signal:
        raise SystemExit(f"[demo] interrupted: {ft.run_id} saved at step {result.final_step}; re-run to continue")
    if result.last_checkpoint is None or Path(result.last_checkpoint) != final:
        raise RuntimeError(f"training '{ft.run_id}' did not write its final checkpoint {final}")
    per_step = seconds / max(1, ft.max_steps - start_step)
    timing.write_text(json.dumps({"seconds_per_step": per_step, "steps": ft.max_steps - start_step}))
    return final, per_step


def theta0_config(cfg: DemoConfig, data_root: Path, run_root: Path) -> FinetuneConfig:
    """Pre-training on A from a random tiny VLA (full fine-tuning)."""
    return FinetuneConfig(
        model_preset="tiny", data_root_dir=data_root, dataset_name=PRETRAIN_SET, run_root_dir=run_root,
        run_id="demo-theta0", batch_size=cfg.batch_size, learning_rate=cfg.pretrain_lr, max_steps=cfg.pretrain_steps,
        num_steps_before_decay=int(cfg.pretrain_decay_fraction * cfg.pretrain_steps), save_freq=cfg.pretrain_steps,
        save_latest_checkpoint_only=True, image_aug=False, use_lora=False, use_proprio=True,
        num_images_in_input=cfg.num_images_in_input, seed=cfg.seed, wandb_mode="disabled")


def finetune_configs(cfg: DemoConfig, data_root: Path, run_root: Path, theta0: Path) -> dict[str, FinetuneConfig]:
    common = FinetuneConfig(
        config_file_path=theta0, model_preset="tiny", data_root_dir=data_root, dataset_name=TARGET_SET,
        run_root_dir=run_root, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, lr_warmup_steps=0,
        num_steps_before_decay=10 * cfg.finetune_steps, max_steps=cfg.finetune_steps, seed=cfg.seed,
        save_freq=cfg.finetune_steps, save_latest_checkpoint_only=True, image_aug=False, use_lora=True,
        lora_rank=cfg.lora_rank, use_proprio=True, num_images_in_input=cfg.num_images_in_input, wandb_mode="disabled",
        wandb_project="vla-craft-demo", log_update_norms=True)
    craft = replace(common, use_craft=True, craft_retention_budget=cfg.craft_retention_budget,
                    craft_dual_lr=cfg.craft_dual_lr)
    return {
        # plain logs the same L_ret every step through the retention monitor (no gradient, training unchanged)
        "plain": replace(common, run_id="demo-plain", use_craft=False, retention_monitor=True,
                         retention_monitor_freq=1),
        "craft": replace(craft, run_id="demo-craft"),
        # the rule that spends its budget on this setting (prismatic/training/dual_presets.py; docs/CRAFT.md)
        "craft_new": replace(craft, run_id="demo-craft_new", **NEW_RULE_FLAGS),
        "craft_pid": replace(craft, run_id="demo-craft_pid", craft_dual_mode="pid", craft_dual_normalize=True,
                             craft_dual_lr=cfg.pid_ki, craft_dual_kp=cfg.pid_kp, craft_dual_kd=cfg.pid_kd),
        # ablation: the dual variable alone (no projection), to show lambda enforcing the budget by itself
        "craft_lambda_only": replace(craft, run_id="demo-craft_lambda_only", craft_enable_projection=False),
        # the Adam remedy tried: a cap on lambda bounds lambda * g_ret and with it AdamW's second moments
        "craft_capped": replace(craft, run_id="demo-craft_capped", craft_max_lambda=cfg.capped_max_lambda),
    }


def continuation_configs(cfg: DemoConfig, run_root: Path, craft_final: Path,
                         base: FinetuneConfig) -> dict[str, FinetuneConfig]:
    """Plain steps from CRaFT-gradient's final checkpoint, resumed from a copy named for the new run (a resumed run
    keeps the run id of its checkpoint folder): as is (AdamW moments inherited), or with the AdamW state emptied
    (fresh moments; weights, lr schedule, data position and RNG are the same)."""
    configs = {}
    end = cfg.finetune_steps + cfg.continuation_steps
    for name, fresh in (("cont_inherited", False), ("cont_fresh", True)):
        run_id = f"demo-{name}"
        start = checkpoint_dir(run_root, run_id, cfg.finetune_steps)
        configs[name] = replace(base, run_id=run_id, use_craft=False, retention_method="none",
                                retention_monitor=True, retention_monitor_freq=1, resume=True,
                                resume_step=cfg.finetune_steps, config_file_path=start, max_steps=end, save_freq=end)
        if not (checkpoint_dir(run_root, run_id, end) / "COMPLETE").is_file() and not start.is_dir():
            staging = run_root / f"{run_id}.partial" / start.name
            shutil.rmtree(staging.parent, ignore_errors=True)
            shutil.copytree(craft_final, staging)
            if fresh:
                state = ckpt.load_training_state(staging)
                state["optimizer"]["state"] = {}  # AdamW restarts its moments (and bias correction) at the next step
                ckpt.save_training_state(staging / TRAINING_STATE_FILE, state)
            # The copy starts a new run: record the continuation's own flags (plain steps), so the resume guard checks
            # against them and does not inherit CRaFT's, then re-seal the edited checkpoint's checksums.
            (staging / RUN_CONFIG_FILE).write_text(json.dumps(config_record(configs[name]), indent=2) + "\n")
            ckpt.reseal_checkpoint(staging)
            staging.rename(start)
            staging.parent.rmdir()
    return configs


def eval_dataset(data_root: Path, dataset_name: str, tokenizer, cfg: DemoConfig,
                 statistics: dict | None = None) -> RLDSFrameDataset:
    """Un-augmented frames of `dataset_name`; `statistics` ({dataset_name: stats}) normalise it like a policy's data."""
    return RLDSFrameDataset(data_root, dataset_name, tokenizer, num_images_in_input=cfg.num_images_in_input,
                            use_proprio=True, image_aug=False, seed=cfg.seed, statistics=statistics)


def heldout_l1(policy, dataset: RLDSFrameDataset, stats: dict, cfg: DemoConfig) -> float:
    """Mean |a_pred - a| over held-out frames and the 8x7 chunk, in raw action units (comparable across models
    trained with different normalisation statistics). `dataset` is normalised with `stats`, the policy's own."""
    errors = []
    with torch.no_grad():
        for batch in make_eval_loader(dataset, batch_size=8, max_frames=cfg.eval_frames):
            pred = policy(batch).actions.float().cpu().numpy()
            target = batch["actions"].numpy()
            errors.append(np.abs(unnormalize_bounds_q99(pred, stats["action"])
                                 - unnormalize_bounds_q99(target, stats["action"])).reshape(len(pred), -1))
    return float(np.concatenate(errors).mean())


def bridge_features(policy, dataset: RLDSFrameDataset, cfg: DemoConfig,
                    max_frames: int | None = -1) -> list[torch.Tensor]:
    """CRaFT's pooled bridge features (default layers and anchor type), one (B, F) tensor per eval batch, over the
    first `max_frames` frames (-1: cfg.eval_frames, None: all)."""
    extractor = CRaFTFeatureExtractor(policy.vla)
    features = []
    with torch.no_grad():
        frames = cfg.eval_frames if max_frames == -1 else max_frames
        for batch in make_eval_loader(dataset, batch_size=8, max_frames=frames):
            with extractor.capture():
                out = policy(batch).vla_output
            features.append(extractor.features(out.layout))
    return features


def retention_against(reference: list[torch.Tensor], features: list[torch.Tensor]) -> float:
    """L_ret of `features` against theta0's `reference` (same frames, same batches): the quantity CRaFT constrains,
    measured identically for every method."""
    losses = [float(retention_loss(f, r)) for f, r in zip(features, reference, strict=True)]
    return float(np.average(losses, weights=[len(r) for r in reference]))


def probe_labels(dataset: RLDSFrameDataset) -> dict[str, np.ndarray]:
    """Per frame in file order (the eval loader's order): task id (= target place: one place per task of A) and the
    block colour index (the synthetic state stores 0.1 * colour index in state[2])."""
    (source,) = dataset.sources
    table = source.table
    steps = table.episode_starts[source.frame_episode] + source.frame_step
    instructions = [table.instructions[int(i)] for i in table.instruction_ids[steps]]
    order = sorted(set(instructions))
    return {"task": np.asarray([order.index(i) for i in instructions]),
            "colour": np.rint(np.asarray(table.states)[steps, 2] * 10).astype(int)}


def reduce_metric(metrics: list[dict], key: str, how: str) -> float:
    """'last' | 'max' | 'mean' of a logged key over the run (nan when the run never logged it)."""
    values = [m[key] for m in metrics if key in m]
    if not values:
        return math.nan
    return float({"last": values[-1], "max": np.max(values), "mean": np.mean(values)}[how])


def steps_above(metrics: list[dict], epsilon: float) -> str:
    """'k/n': steps whose logged L_ret (CRaFT's own, or the retention monitor's) exceeds epsilon."""
    values = [m[RET_KEY] for m in metrics if RET_KEY in m]
    return f"{sum(v > epsilon for v in values)}/{len(values)}" if values else "-"


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
COLUMNS = (("method", "Method", "s"),
           ("heldout_l1_target", "Held-out L1 (new tasks B)", ".4f"),
           ("heldout_l1_pretrain", "Held-out L1 (pre-training tasks A)", ".4f"),
           ("final_l_ret", "Final L_ret", ".4f"),
           ("epsilon", "epsilon", ".4f"),
           ("steps_above_eps", "Steps with L_ret > eps", "s"),
           ("probe_task", "Probe acc. task (A)", ".3f"),
           ("probe_colour", "Probe acc. colour (A)", ".3f"))
DYNAMICS_COLUMNS = (("method", "Method", "s"),
                    ("max_lambda", "Max lambda", ".3f"),
                    ("final_lambda", "Final lambda", ".3f"),
                    ("projection_fired_rate", "Projection fired", ".2f"),
                    ("mean_cosine", "Mean cos(g_act, g_ret)", ".3f"),
                    ("mean_conflict_ratio", "Conflict ratio", ".3f"),
                    ("mean_conflict_null", "Conflict ratio null", ".3f"),
                    ("update_llm_lora", "Mean update norm LLM LoRA", ".2e"),
                    ("adam_llm_lora", "Final sqrt(v) LLM LoRA", ".2e"),
                    ("update_action_queries", "Mean update norm queries", ".2e"),
                    ("adam_action_queries", "Final sqrt(v) queries", ".2e"),
                    ("steps_per_s", "Steps/s", ".2f"))


def _fmt(value, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec) if spec != "s" else str(value)


def _markdown(rows: list[dict], columns) -> str:
    header = [title for _, title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[k], s) for k, _, s in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _latex(rows: list[dict], columns) -> list[str]:
    header = [title for _, title, _ in columns]
    tex = ["\\begin{tabular}{l" + "r" * (len(columns) - 1) + "}", "\\toprule",
           " & ".join(t.replace("_", "\\_").replace(">", "$>$") for t in header) + " \\\\", "\\midrule"]
    tex += [" & ".join(_fmt(r[k], s).replace("_", "\\_") for k, _, s in columns) + " \\\\" for r in rows]
    return tex + ["\\bottomrule", "\\end{tabular}"]


def write_report(rows: list[dict], out: Path) -> str:
    """Two tables (outcomes, then dynamics) in results.md / .tex; every key in results.csv / .json."""
    markdown = _markdown(rows, COLUMNS) + "\n" + _markdown(rows, DYNAMICS_COLUMNS)
    (out / "results.md").write_text(markdown)
    keys = list(dict.fromkeys(k for k, _, _ in COLUMNS + DYNAMICS_COLUMNS))
    csv_lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
    (out / "results.csv").write_text("\n".join(csv_lines) + "\n")
    (out / "results.tex").write_text("\n".join(_latex(rows, COLUMNS) + [""] + _latex(rows, DYNAMICS_COLUMNS)) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return markdown


def training_curves(run_root: Path, out: Path) -> list[Path]:
    """log_parser's tables and plots (lambda, L_ret against epsilon, conflict ratio, action loss) of the demo runs."""
    spec = importlib.util.spec_from_file_location("log_parser", REPO / "craft_experiments/common_utils/log_parser.py")
    log_parser = importlib.util.module_from_spec(spec)
    sys.modules["log_parser"] = log_parser
    spec.loader.exec_module(log_parser)
    # every run but the continuations: those are plain runs of the same seed (log_parser would refuse the collision)
    runs = [p for p in sorted(run_root.iterdir()) if p.is_dir() and "--" not in p.name and not p.name.startswith(".")
            and not any(p.name == f"demo-{name}" for name in CONTINUATIONS)]
    results = log_parser.collect(runs, ddof=0)
    return log_parser.write_outputs(results, out / "log_parser", ddof=0, latex=True, plots=True)


def demo_plots(run_metrics: dict[str, list[dict]], epsilon: float, out: Path) -> list[Path]:
    """retention.png (L_ret of every run, epsilon, log scale, one panel), lambda.png, update_norms.png; the study's
    style (vla-scripts/retention_plots.py)."""
    plt = rp.pyplot()
    colours = rp.colours(list(METHOD_TITLES))
    paths = []

    def series(records, key):
        pairs = [(r["step"], r[key]) for r in records if key in r]
        return ([a for a, _ in pairs], [b for _, b in pairs])

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, records in run_metrics.items():
        steps, values = series(records, RET_KEY)
        rp.band(ax, [(steps, values)] if steps else [], colours[name], METHOD_TITLES[name], log=True,
                linestyle="--" if name in CONTINUATIONS else "-")
    rp.epsilon_line(ax, epsilon)
    rp.retention_axes(ax, "Drift of the bridge features from θ0, every run")
    ax.legend(fontsize=7)
    paths.append(rp.save(fig, out / "retention.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    for name, records in run_metrics.items():
        steps, values = series(records, LAMBDA_KEY)
        rp.band(ax, [(steps, values)] if steps else [], colours[name], METHOD_TITLES[name])
    rp.lambda_axes(ax, "Dual variable")
    ax.legend(fontsize=7)
    paths.append(rp.save(fig, out / "lambda.png"))

    fig, axes = plt.subplots(2, len(NORM_GROUPS), figsize=(4 * len(NORM_GROUPS), 7), squeeze=False)
    for col, group in enumerate(NORM_GROUPS):
        for row, (key, label) in enumerate(((UPDATE_KEY, "||update||"), (ADAM_KEY, "mean sqrt(v_hat)"))):
            ax = axes[row][col]
            for name, records in run_metrics.items():
                steps, values = series(records, key.format(group))
                if steps:
                    ax.plot(steps, np.maximum(values, 1e-12), color=colours[name], linewidth=1.0,
                            linestyle="--" if name in CONTINUATIONS else "-", label=METHOD_TITLES[name])
            ax.set(yscale="log", title=f"{group}: {label}", xlabel="optimizer step")
    axes[0][0].legend(fontsize=6)
    paths.append(rp.save(fig, out / "update_norms.png", dpi=100))
    return paths


def libero_rollout(cfg: DemoConfig, chkpt: Path, out: Path) -> dict | None:
    wanted = cfg.libero_rollout
    if wanted not in ("auto", "always", "never"):  # not yes/no: YAML-style parsing turns those into booleans
        raise ValueError(f"--libero_rollout must be auto, always or never, got '{wanted}'")
    installed = importlib.util.find_spec("libero") is not None
    if wanted == "never" or (wanted == "auto" and not installed):
        print("[demo] LIBERO rollout skipped" + ("" if installed else " (the `libero` extra is not installed)"))
        return None
    sys.path.insert(0, str(REPO / "LIBERO"))
    from run_libero_eval import EvalConfig, run_evaluation

    eval_cfg = EvalConfig(pretrained_checkpoint=str(chkpt), task_suite_name="libero_spatial", task_ids=[0],
                          num_trials_per_task=1, max_steps_override=cfg.libero_max_steps, save_videos=True,
                          local_log_dir=str(out / "libero_rollout"), num_envs=0, seed=cfg.seed,
                          center_crop=False)  # the demo trains without crop augmentation
    print("[demo] one short headless LIBERO rollout of the CRaFT policy (a tiny policy trained on synthetic data: "
          "it is expected to FAIL the task; the rollout shows the full closed loop works)")
    summary = run_evaluation(eval_cfg)
    videos = sorted((out / "libero_rollout").rglob("*.mp4"))
    print(f"[demo] LIBERO: success={summary['num_successes']}/{summary['num_episodes']}; "
          f"video: {videos[0] if videos else 'none'}")
    return summary


def main(cfg: DemoConfig) -> list[dict]:
    cfg = cfg.resolved()
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir).resolve()
    data_root, run_root = out / "data", out / "runs"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    print("[demo] 1/6 embedded tiny LIBERO-schema datasets")
    build_data(cfg, data_root)

    print("[demo] 2/6 theta0: tiny VLA pre-trained on task set A")
    theta0_path, theta0_seconds_per_step = run_training(theta0_config(cfg, data_root, run_root))

    print("[demo] 3/6 fine-tuning on task set B (same steps, same data stream), then plain continuations of CRaFT")
    configs = finetune_configs(cfg, data_root, run_root, theta0_path)
    runs = {name: run_training(ft) for name, ft in configs.items()}
    for name, ft in continuation_configs(cfg, run_root, runs["craft"][0], configs["craft"]).items():
        runs[name] = run_training(ft)

    print("[demo] 4/6 held-out evaluation and linear probe")
    theta0 = load_policy(theta0_path).eval()
    tokenizer = theta0.processor.tokenizer
    # L_ret is measured on the un-augmented training frames of B; theta0's side is computed once.
    train_frames = eval_dataset(data_root, TARGET_SET, tokenizer, cfg)
    reference = bridge_features(theta0, train_frames, cfg)
    # the probe: fitted once on theta0's features of A's training frames, applied to A's held-out frames
    probe_train = eval_dataset(data_root, PRETRAIN_SET, tokenizer, cfg)
    probe_test = eval_dataset(data_root, PRETRAIN_HELDOUT, tokenizer, cfg)
    train_labels, test_labels = probe_labels(probe_train), probe_labels(probe_test)
    theta0_train_features = torch.cat(bridge_features(theta0, probe_train, cfg, max_frames=None))
    probes = {k: fit_ridge_probe(theta0_train_features, train_labels[k], alpha=cfg.probe_alpha) for k in train_labels}
    heldout_sets: dict[tuple[str, str], RLDSFrameDataset] = {}  # (dataset, stats key): the fine-tuned runs share one
    rows, run_metrics = [], {}
    for name, path in tqdm([("theta0", theta0_path)] + [(n, runs[n][0]) for n in runs], desc="evaluate"):
        policy = theta0 if name == "theta0" else load_policy(path).eval()
        metrics = read_metrics(run_root / f"demo-{name}" / "metrics.jsonl")
        if name != "theta0":
            run_metrics[name] = metrics
        seconds_per_step = runs[name][1] if name in runs else theta0_seconds_per_step
        stats_key = PRETRAIN_SET if name == "theta0" else TARGET_SET
        stats = policy.norm_stats[stats_key]
        heldout = {}
        for column, dataset_name in (("heldout_l1_target", TARGET_HELDOUT), ("heldout_l1_pretrain", PRETRAIN_HELDOUT)):
            key = (dataset_name, stats_key)
            if key not in heldout_sets:
                heldout_sets[key] = eval_dataset(data_root, dataset_name, tokenizer, cfg, {dataset_name: stats})
            heldout[column] = heldout_l1(policy, heldout_sets[key], stats, cfg)
        l_ret = 0.0 if name == "theta0" else retention_against(reference, bridge_features(policy, train_frames, cfg))
        test_features = torch.cat(bridge_features(policy, probe_test, cfg, max_frames=None))
        rows.append({  # CRaFT keys exist only in CRaFT runs' metrics: nan elsewhere
            "method": METHOD_TITLES[name],
            **heldout,
            "final_l_ret": l_ret,
            "epsilon": cfg.craft_retention_budget,
            "steps_above_eps": "-" if name == "theta0" else steps_above(metrics, cfg.craft_retention_budget),
            "probe_task": probes["task"].accuracy(test_features, test_labels["task"]),
            "probe_colour": probes["colour"].accuracy(test_features, test_labels["colour"]),
            "final_lambda": reduce_metric(metrics, LAMBDA_KEY, "last"),
            "max_lambda": reduce_metric(metrics, LAMBDA_KEY, "max"),
            "projection_fired_rate": reduce_metric(metrics, "CRaFT/Projection Fired", "mean"),
            "mean_cosine": reduce_metric(metrics, "CRaFT/Grad Cosine", "mean"),
            "mean_conflict_ratio": reduce_metric(metrics, "CRaFT/Conflict Ratio", "mean"),
            "mean_conflict_null": reduce_metric(metrics, "CRaFT/Conflict Ratio Null", "mean"),
            "max_train_retention_loss": reduce_metric(metrics, RET_KEY, "max"),
            **{f"update_{g}": reduce_metric(metrics, UPDATE_KEY.format(g), "mean") for g in NORM_GROUPS},
            **{f"adam_{g}": reduce_metric(metrics, ADAM_KEY.format(g), "last") for g in NORM_GROUPS},
            "steps_per_s": 1.0 / seconds_per_step if seconds_per_step > 0 else math.nan,
        })

    print("[demo] 5/6 report")
    table = write_report(rows, out)
    plots = demo_plots(run_metrics, cfg.craft_retention_budget, out) + training_curves(run_root, out)

    print("[demo] 6/6 LIBERO rollout")
    libero_rollout(cfg, runs["craft"][0], out)

    print("\n" + table)
    print("L_ret: squared distance of pooled bridge features (Raw Latent at layer m, ActionQuery at layer M) to "
          "theta0's, summed over feature dims and averaged over the training frames of B. 'Steps with L_ret > eps': "
          "from the L_ret logged at every training step (CRaFT's own, or the retention monitor's). Probe: ridge "
          "classifier fitted on theta0's features of A's training frames, applied unchanged to each model's "
          "features of A's held-out frames (chance: 1/6 task, about 1/5 colour). Projection fired, cosine and "
          "conflict ratios: means over the run's steps; update norms: mean per step; sqrt(v): AdamW's bias-corrected "
          "second moment after the last step.")
    print(f"Tables: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.tex'}")
    print("Plots: " + ", ".join(str(p) for p in plots if str(p).endswith(".png")))
    print(f"[demo] done in {time.perf_counter() - started:.0f} s")
    return rows


@cli_entry("demo")
def cli_main(argv: list[str] | None = None) -> None:
    main(parse_config(DemoConfig, argv))


if __name__ == "__main__":
    cli_main()
