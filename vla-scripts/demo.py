"""`make demo`: CRaFT against plain fine-tuning on a fresh CPU machine, in minutes.

Stages (each skipped when its output already exists, so a re-run reuses what is built):
  1. data      embedded tiny datasets in the exact LIBERO RLDS schema (synthetic scenes whose actions depend on
               the image and the instruction): a pre-training task set A and a fine-tuning task set B (disjoint
               tasks), each with held-out episodes;
  2. theta0    the tiny VLA pre-trained on A (full fine-tuning): the snapshot whose representations CRaFT retains;
  3. finetune  plain LoRA fine-tuning and CRaFT on B from theta0, same seed, same steps, same data stream;
  4. evaluate  held-out action L1 (raw action units) on B and on A (forgetting), final L_ret of each model against
               theta0 measured the same way for both (un-augmented training frames of B), lambda, conflict ratio;
  5. report    a printed table, `results.{csv,md,tex}`, `results.json`, training-curve PNGs (log_parser);
  6. libero    if the `libero` extra is installed: one short headless LIBERO rollout of the CRaFT policy with a
               video (the tiny policy was never trained on LIBERO: it fails the task; the run shows the loop works).

    python vla-scripts/demo.py --output_dir demo_runs            # full demo
    python vla-scripts/demo.py --output_dir /tmp/d --quick True   # reduced steps (tests)
"""

from __future__ import annotations

import importlib.util
import json
import math
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

from finetune import train
from prismatic.cli_errors import cli_entry, parse_config
from prismatic.data.loader import make_eval_loader
from prismatic.data.normalization import unnormalize_bounds_q99
from prismatic.data.rlds_dataset import RLDSFrameDataset
from prismatic.data.synthetic_libero import make_synthetic_libero_dataset
from prismatic.models.loaders import load_policy
from prismatic.training.craft_utils import CRaFTFeatureExtractor, retention_loss
from prismatic.training.finetune_config import FinetuneConfig
from prismatic.training.metrics_log import read_metrics

PRETRAIN_SET, PRETRAIN_HELDOUT = "demo_pretrain_no_noops", "demo_pretrain_heldout_no_noops"
TARGET_SET, TARGET_HELDOUT = "demo_target_no_noops", "demo_target_heldout_no_noops"
METHOD_TITLES = {"theta0": "theta0 (before fine-tuning)", "plain": "plain fine-tuning", "craft": "CRaFT",
                 "craft_lambda_only": "CRaFT, lambda only (no projection)"}
PRETRAIN_TASKS = (0, 1, 2, 3, 4, 5)  # "push the block to the <place>"
TARGET_TASKS = (8, 9, 10, 11)  # "quickly push the block to the <place>": new tasks, new action scale


@dataclass
class DemoConfig:
    # fmt: off
    output_dir: Path = Path("demo_runs")
    quick: bool = False                    # reduced steps and data (for tests); numbers are then not meaningful
    seed: int = 7
    threads: int = 2                       # torch CPU threads
    # data
    episodes_per_task: int = 6
    heldout_episodes_per_task: int = 2
    steps_per_episode: int = 24
    num_images_in_input: int = 2
    # theta0 pre-training (full fine-tuning from a random tiny VLA)
    pretrain_steps: int = 250
    pretrain_lr: float = 1e-3
    # fine-tuning on the new tasks (LoRA, as upstream)
    finetune_steps: int = 160
    batch_size: int = 8
    learning_rate: float = 1e-3
    lora_rank: int = 8
    # CRaFT
    craft_retention_budget: float = 0.02   # epsilon, in units of L_ret (sum over feature dims, mean over samples)
    craft_dual_lr: float = 5.0             # eta_lambda: L_ret is small here, so lambda needs a large step to move
    # evaluation
    eval_frames: int = 256                 # held-out frames per set (cap)
    libero_rollout: str = "auto"           # auto (if the extra is installed) | always | never
    libero_max_steps: int = 24
    # fmt: on

    def resolved(self) -> DemoConfig:
        if not self.quick:
            return self
        return replace(self, episodes_per_task=2, heldout_episodes_per_task=1, steps_per_episode=12,
                       pretrain_steps=6, finetune_steps=4, batch_size=2, eval_frames=8, libero_max_steps=8,
                       num_images_in_input=1)


# ---------------------------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------------------------
def build_data(cfg: DemoConfig, data_root: Path) -> None:
    specs = ((PRETRAIN_SET, PRETRAIN_TASKS, cfg.episodes_per_task, 1),
             (PRETRAIN_HELDOUT, PRETRAIN_TASKS, cfg.heldout_episodes_per_task, 2),
             (TARGET_SET, TARGET_TASKS, cfg.episodes_per_task, 3),
             (TARGET_HELDOUT, TARGET_TASKS, cfg.heldout_episodes_per_task, 4))
    for name, tasks, episodes, seed_offset in specs:
        if (data_root / name / "1.0.0" / "dataset_info.json").is_file():
            continue
        make_synthetic_libero_dataset(data_root, name, task_indices=tasks, episodes_per_task=episodes,
                                      steps=cfg.steps_per_episode, seed=cfg.seed * 100 + seed_offset)


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
    start_step = 0
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


def finetune_configs(cfg: DemoConfig, data_root: Path, run_root: Path, theta0: Path) -> dict[str, FinetuneConfig]:
    common = FinetuneConfig(
        config_file_path=theta0, model_preset="tiny", data_root_dir=data_root, dataset_name=TARGET_SET,
        run_root_dir=run_root, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, lr_warmup_steps=0,
        num_steps_before_decay=10 * cfg.finetune_steps, max_steps=cfg.finetune_steps, seed=cfg.seed,
        save_freq=cfg.finetune_steps, save_latest_checkpoint_only=True, image_aug=False, use_lora=True,
        lora_rank=cfg.lora_rank, use_proprio=True, num_images_in_input=cfg.num_images_in_input, wandb_mode="disabled",
        wandb_project="vla-craft-demo")
    return {
        "plain": replace(common, run_id="demo-plain", use_craft=False),
        "craft": replace(common, run_id="demo-craft", use_craft=True,
                         craft_retention_budget=cfg.craft_retention_budget, craft_dual_lr=cfg.craft_dual_lr),
        # ablation: the dual variable alone (no projection), to show lambda enforcing the budget by itself
        "craft_lambda_only": replace(common, run_id="demo-craft_lambda_only", use_craft=True,
                                     craft_enable_projection=False, craft_retention_budget=cfg.craft_retention_budget,
                                     craft_dual_lr=cfg.craft_dual_lr),
    }


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


def bridge_features(policy, dataset: RLDSFrameDataset, cfg: DemoConfig) -> list[torch.Tensor]:
    """CRaFT's pooled bridge features (default layers and anchor type), one (B, F) tensor per eval batch."""
    extractor = CRaFTFeatureExtractor(policy.vla)
    features = []
    with torch.no_grad():
        for batch in make_eval_loader(dataset, batch_size=8, max_frames=cfg.eval_frames):
            with extractor.capture():
                out = policy(batch).vla_output
            features.append(extractor.features(out.layout))
    return features


def retention_against(reference: list[torch.Tensor], features: list[torch.Tensor]) -> float:
    """L_ret of `features` against theta0's `reference` (same frames, same batches): the quantity CRaFT constrains,
    measured identically for every method."""
    losses = [float(retention_loss(f, r)) for f, r in zip(features, reference, strict=True)]
    return float(np.average(losses, weights=[len(r) for r in reference]))


def reduce_metric(metrics: list[dict], key: str, how: str) -> float:
    """'last' | 'max' | 'mean' of a logged key over the run (nan when the run never logged it)."""
    values = [m[key] for m in metrics if key in m]
    if not values:
        return math.nan
    return float({"last": values[-1], "max": np.max(values), "mean": np.mean(values)}[how])


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
COLUMNS = (("method", "Method", "s"),
           ("heldout_l1_target", "Held-out L1 (new tasks)", ".4f"),
           ("heldout_l1_pretrain", "Held-out L1 (pre-training tasks)", ".4f"),
           ("final_l_ret", "Final L_ret", ".4f"),
           ("epsilon", "epsilon", ".4f"),
           ("within_budget", "L_ret <= eps", "s"),
           ("final_lambda", "Final lambda", ".3f"),
           ("max_lambda", "Max lambda", ".3f"),
           ("mean_conflict_ratio", "Mean conflict ratio", ".3f"),
           ("steps_per_s", "Steps/s", ".2f"))


def _fmt(value, spec: str) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return format(value, spec) if spec != "s" else str(value)


def write_report(rows: list[dict], out: Path) -> str:
    header = [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(r[k], s) for k, _, s in COLUMNS) + " |" for r in rows]
    markdown = "\n".join(lines) + "\n"
    (out / "results.md").write_text(markdown)
    csv_lines = [",".join(k for k, _, _ in COLUMNS)] + [",".join(str(r[k]) for k, _, _ in COLUMNS) for r in rows]
    (out / "results.csv").write_text("\n".join(csv_lines) + "\n")
    tex = ["\\begin{tabular}{l" + "r" * (len(COLUMNS) - 1) + "}", "\\toprule",
           " & ".join(t.replace("_", "\\_").replace("<=", "$\\le$") for t in header) + " \\\\", "\\midrule"]
    tex += [" & ".join(_fmt(r[k], s).replace("_", "\\_") for k, _, s in COLUMNS) + " \\\\" for r in rows]
    tex += ["\\bottomrule", "\\end{tabular}"]
    (out / "results.tex").write_text("\n".join(tex) + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    return markdown


def training_curves(run_root: Path, out: Path) -> list[Path]:
    """log_parser's tables and plots (lambda, L_ret against epsilon, conflict ratio, action loss) of the demo runs."""
    spec = importlib.util.spec_from_file_location("log_parser", REPO / "craft_experiments/common_utils/log_parser.py")
    log_parser = importlib.util.module_from_spec(spec)
    sys.modules["log_parser"] = log_parser
    spec.loader.exec_module(log_parser)
    results = log_parser.collect([run_root], ddof=0)
    return log_parser.write_outputs(results, out / "log_parser", ddof=0, latex=True, plots=True)


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
    theta0_cfg = FinetuneConfig(
        model_preset="tiny", data_root_dir=data_root, dataset_name=PRETRAIN_SET, run_root_dir=run_root,
        run_id="demo-theta0", batch_size=cfg.batch_size, learning_rate=cfg.pretrain_lr, max_steps=cfg.pretrain_steps,
        num_steps_before_decay=int(0.8 * cfg.pretrain_steps), save_freq=cfg.pretrain_steps,
        save_latest_checkpoint_only=True, image_aug=False, use_lora=False, use_proprio=True,
        num_images_in_input=cfg.num_images_in_input, seed=cfg.seed, wandb_mode="disabled")
    theta0_path, theta0_seconds_per_step = run_training(theta0_cfg)

    print("[demo] 3/6 plain fine-tuning and CRaFT on task set B (same steps, same data stream)")
    runs = {name: run_training(ft) for name, ft in finetune_configs(cfg, data_root, run_root, theta0_path).items()}

    print("[demo] 4/6 held-out evaluation")
    theta0 = load_policy(theta0_path).eval()
    tokenizer = theta0.processor.tokenizer
    # L_ret is measured on the un-augmented training frames of B; theta0's side is computed once.
    train_frames = eval_dataset(data_root, TARGET_SET, tokenizer, cfg)
    reference = bridge_features(theta0, train_frames, cfg)
    heldout_sets: dict[tuple[str, str], RLDSFrameDataset] = {}  # (dataset, stats key): the fine-tuned runs share one
    rows = []
    for name, path in tqdm([("theta0", theta0_path)] + [(n, runs[n][0]) for n in runs], desc="evaluate"):
        policy = theta0 if name == "theta0" else load_policy(path).eval()
        metrics = read_metrics(run_root / f"demo-{name}" / "metrics.jsonl")
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
        rows.append({  # CRaFT keys exist only in CRaFT runs' metrics: nan elsewhere
            "method": METHOD_TITLES[name],
            **heldout,
            "final_l_ret": l_ret,
            "epsilon": cfg.craft_retention_budget,
            "within_budget": "yes" if l_ret <= cfg.craft_retention_budget * 1.10 else "no",
            "final_lambda": reduce_metric(metrics, "CRaFT/Lambda", "last"),
            "max_lambda": reduce_metric(metrics, "CRaFT/Lambda", "max"),
            "mean_conflict_ratio": reduce_metric(metrics, "CRaFT/Conflict Ratio", "mean"),
            "max_train_retention_loss": reduce_metric(metrics, "CRaFT/Retention Loss", "max"),
            "steps_per_s": 1.0 / seconds_per_step if seconds_per_step > 0 else math.nan,
        })

    print("[demo] 5/6 report")
    table = write_report(rows, out)
    plots = training_curves(run_root, out)

    print("[demo] 6/6 LIBERO rollout")
    libero_rollout(cfg, runs["craft"][0], out)

    print("\n" + table)
    print("L_ret: squared distance of pooled bridge features (Raw Latent at layer m, ActionQuery at layer M) to "
          "theta0's, summed over feature dims and averaged over the training frames of B; 'L_ret <= eps' allows "
          "10% tolerance.")
    print(f"Tables: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.tex'}")
    print("Plots: " + ", ".join(str(p) for p in plots if str(p).endswith(".png")))
    print(f"[demo] done in {time.perf_counter() - started:.0f} s")
    return rows


@cli_entry("demo")
def cli_main(argv: list[str] | None = None) -> None:
    main(parse_config(DemoConfig, argv))


if __name__ == "__main__":
    cli_main()
