"""`make study`: what the retention budget buys, over seeds, against every baseline (issue 26).

Same embedded data and θ0 as `make demo` (its stages, its seed), then LoRA fine-tuning on the new tasks B for every
method and fine-tuning seed (`--seed` of the run: LoRA init, data order, head noise):
  baselines  plain, Freeze (vision frozen), Align, ConSFT-style, knowledge insulation (each with the retention
             monitor, so L_ret is logged every step as under CRaFT);
  CRaFT      the paper's dual rule, the new dual rule (νPI, docs/CRAFT.md "Dual modes"), projection off (λ only),
             dual off (fixed λ);
  sweeps     ε for CRaFT with the new rule (two decades), Align's weight, ConSFT's clip ρ, KI's token-loss weight.
Per run: held-out action L1 on B and on A (raw units), the final L_ret against θ0 on B's training frames, the task /
colour probe (fitted on θ0's features of A) on A's held-out frames, the budget numbers of the logged L_ret (last-10%
mean / ε, share of steps above ε after the first 10%), λ, AdamW's final √v̂ of the LLM LoRA.

Runs go to `--workers` processes with `--threads_per_worker` torch threads each; every run is a pure function of its
flags (same machine, same command, same numbers: tested with 1 worker against 2), so the assignment does not matter.
A finished run (its `study_eval.json`) is reused: an interrupted study continues where it stopped.
Outputs in `--output_dir`: results.{md,csv,json} (mean ± std over seeds, with n; every run's numbers and the
environment), front.png (retention/plasticity), retention_curves.png, epsilon_sweep.png, lambda_curves.png.

    python vla-scripts/study.py --output_dir study_runs                  # the full study (README: time measured)
    python vla-scripts/study.py --output_dir /tmp/s --quick True          # one seed, few steps: structure only
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "vla-scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import demo  # noqa: E402  (the demo's data, θ0, fine-tuning flags and evaluation are the study's)
import retention_plots as rp  # noqa: E402
from demo_cache import demo_cache_flags  # noqa: E402
from dual_budget import budget_metrics, parse_seeds  # noqa: E402

from finetune import NonFiniteLossError  # noqa: E402
from prismatic.cli_errors import UserError, cli_entry, parse_config  # noqa: E402
from prismatic.training.craft_variants import (  # noqa: E402
    CHEAP_VARIANT_FLAGS,
    COEFFICIENT_VARIANT_FLAGS,
    COEFFICIENT_WORK_RATIOS,
    WORK_RATIOS,
)
from prismatic.training.dual_presets import NEW_RULE_FLAGS, NUPI_FLAGS  # noqa: E402
from prismatic.training.metrics_log import read_metrics  # noqa: E402
from prismatic.training.update_norms import ADAM_KEY  # noqa: E402

EVAL_FILE, THETA0_EVAL_FILE = "study_eval.json", "theta0_eval.pt"


@dataclass
class StudyConfig:
    # fmt: off
    output_dir: Path = Path("study_runs")
    seeds: str = "7,8,9"                   # fine-tuning seeds; data and θ0 use the demo's seed
    quick: bool = False                    # one seed, the demo's reduced steps: checks the outputs' structure only
    workers: int = 2                       # runs in parallel (processes)
    threads_per_worker: int = 1            # torch threads per run (recorded; part of "same command")
    methods: str = "all"                   # comma-separated subset of METHODS (and of their sweeps), or all
    fixed_lambda: float = 1.0              # λ of the "dual off" row
    # fmt: on


@dataclass(frozen=True)
class Method:
    title: str
    base: str                              # "plain" (retention monitor on) or "craft" (the demo's CRaFT row)
    overrides: tuple[tuple[str, object], ...] = ()
    sweep: tuple[str, tuple[float, ...]] | None = None  # (flag, values incl. the default) for this method's knob
    cache: bool = False                    # θ0's anchors from the study's offline cache (built once) instead of online


def methods(cfg: StudyConfig) -> dict[str, Method]:
    new_rule = tuple(NEW_RULE_FLAGS.items())
    return {
        "plain": Method("plain fine-tuning", "plain"),
        "freeze": Method("Freeze (vision frozen)", "plain", (("freeze_vision_backbone", True),)),
        "align": Method("Align", "plain", (("retention_method", "align"),),
                        ("align_weight", (0.05, 0.2, 0.8, 3.2))),
        "consft": Method("ConSFT-style", "plain", (("retention_method", "consft"),),
                         ("consft_clip", (0.05, 0.2, 0.5, 0.9))),
        "ki": Method("knowledge insulation", "plain", (("retention_method", "ki"),),
                     ("ki_action_loss_weight", (0.1, 1.0, 10.0))),
        "craft_paper": Method("CRaFT, paper's dual rule", "craft"),
        "craft_new": Method("CRaFT, new dual rule (warm-started PI)", "craft", new_rule,
                            ("craft_retention_budget", (0.002, 0.005, 0.02, 0.05, 0.2))),
        "craft_nupi": Method("CRaFT, νPI (first try)", "craft", tuple(NUPI_FLAGS.items())),
        "craft_lambda_only": Method("CRaFT, λ only (no projection)", "craft", (("craft_enable_projection", False),)),
        "craft_fixed_lambda": Method(f"CRaFT, dual off (fixed λ = {cfg.fixed_lambda:g})", "craft",
                                     (("craft_enable_dual", False), ("craft_fixed_lambda", cfg.fixed_lambda))),
        # AdamW's v from the action part only: λ above ~0.025 diverges here (docs/CRAFT.md), so λ is capped
        "craft_adam_action": Method("CRaFT, AdamW v without λ·g_ret (λ ≤ 0.02)", "craft",
                                    (("craft_adam_second_moment", "action"), ("craft_max_lambda", 0.02))),
        # the cheaper step: g_ret reused for k steps (work ratio at real size: craft_variants.WORK_RATIOS)
        "craft_reuse_gret": Method(f"CRaFT, paper's rule, g_ret every {CHEAP_VARIANT_FLAGS['craft_retention_every']} "
                                   f"steps ({WORK_RATIOS['online'][CHEAP_VARIANT_FLAGS['craft_retention_every']]:.2f}"
                                   "x work)", "craft", tuple(CHEAP_VARIANT_FLAGS.items())),
        # the cheaper step that keeps fresh gradients, and its exact reference, both with cached anchors
        "craft_paper_cache": Method("CRaFT, paper's rule, cached anchors (1.48x work)", "craft", cache=True),
        "craft_coef": Method(f"CRaFT, paper's rule, cached anchors, coefficient every "
                             f"{COEFFICIENT_VARIANT_FLAGS['craft_retention_every']} steps ("
                             f"{COEFFICIENT_WORK_RATIOS['offline'][COEFFICIENT_VARIANT_FLAGS['craft_retention_every']]:.2f}"
                             "x work)", "craft", tuple(COEFFICIENT_VARIANT_FLAGS.items()), cache=True),
    }


@dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    knob: str | None = None                # the method's swept flag (None: the method has no sweep)
    value: float | None = None             # its value in this run
    default: bool = True                   # the method's default setting (the row of the main table)

    def overrides(self, table: dict[str, Method]) -> dict:
        flags = dict(table[self.method].overrides)
        if self.knob is not None:
            flags[self.knob] = self.value
        return flags


def plan(cfg: StudyConfig, table: dict[str, Method], bases: dict) -> list[RunSpec]:
    """Every run: each method's default setting per seed, then each sweep value other than the default."""
    seeds = parse_seeds(cfg.seeds)
    if cfg.quick:
        seeds = seeds[:1]
    specs, sweeps = [], []
    for name, method in table.items():
        if method.sweep is None:
            specs += [RunSpec(name, seed) for seed in seeds]
            continue
        knob, values = method.sweep
        default = getattr(replace(bases[method.base], **dict(method.overrides)), knob)
        specs += [RunSpec(name, seed, knob, default) for seed in seeds]
        sweeps += [RunSpec(name, seed, knob, v, default=False) for v in values if v != default for seed in seeds]
    return specs + sweeps


def run_config(spec: RunSpec, table: dict[str, Method], bases: dict, cfg_tag: str, cache_dir: Path):
    flags = spec.overrides(table)
    if table[spec.method].cache:
        flags["craft_anchor_source"] = "offline"
    # the id hashes the flags but not where the cache lives: a moved study folder keeps its run ids
    tag = hashlib.sha1(json.dumps([cfg_tag, sorted(flags.items())], default=str).encode()).hexdigest()[:8]
    setting = "" if spec.default else f"-{spec.knob}{spec.value:g}"
    if table[spec.method].cache:
        flags["craft_cache_dir"] = cache_dir
    return replace(bases[table[spec.method].base], run_id=f"study-{spec.method}{setting}-{tag}-s{spec.seed}",
                   seed=spec.seed, log_update_norms=True, **flags)


# ---------------------------------------------------------------------------------------------------------------------
# θ0's side of the evaluation (computed once, shared by every run)
# ---------------------------------------------------------------------------------------------------------------------
def theta0_evaluation(dcfg, data_root: Path, theta0_path: Path, out: Path) -> dict:
    """Reference features of θ0 on B's training frames, the probes (fitted on θ0's features of A's training frames)
    and θ0's own row; saved to `theta0_eval.pt` so every worker uses the same ones."""
    path = out / THETA0_EVAL_FILE
    if path.is_file():
        return torch.load(path, weights_only=False)
    from prismatic.models.loaders import load_policy
    from prismatic.training.ridge_probe import fit_ridge_probe

    theta0 = load_policy(theta0_path).eval()
    tokenizer = theta0.processor.tokenizer
    train_frames = demo.eval_dataset(data_root, demo.TARGET_SET, tokenizer, dcfg)
    probe_train = demo.eval_dataset(data_root, demo.PRETRAIN_SET, tokenizer, dcfg)
    labels = demo.probe_labels(probe_train)
    features = torch.cat(demo.bridge_features(theta0, probe_train, dcfg, max_frames=None))
    context = {"reference": demo.bridge_features(theta0, train_frames, dcfg),
               "probes": {k: fit_ridge_probe(features, labels[k], alpha=dcfg.probe_alpha) for k in labels}}
    context["theta0_row"] = evaluate_policy(theta0, demo.PRETRAIN_SET, context, dcfg, data_root, is_theta0=True)
    tmp = path.with_suffix(".partial")
    torch.save(context, tmp)
    tmp.rename(path)
    return context


def evaluate_policy(policy, stats_key: str, context: dict, dcfg, data_root: Path, is_theta0: bool = False) -> dict:
    tokenizer = policy.processor.tokenizer
    stats = policy.norm_stats[stats_key]
    row = {}
    for column, name in (("heldout_l1_target", demo.TARGET_HELDOUT), ("heldout_l1_pretrain", demo.PRETRAIN_HELDOUT)):
        frames = demo.eval_dataset(data_root, name, tokenizer, dcfg, {name: stats})
        row[column] = demo.heldout_l1(policy, frames, stats, dcfg)
    train_frames = demo.eval_dataset(data_root, demo.TARGET_SET, tokenizer, dcfg)
    row["final_l_ret"] = 0.0 if is_theta0 else demo.retention_against(
        context["reference"], demo.bridge_features(policy, train_frames, dcfg))
    probe_test = demo.eval_dataset(data_root, demo.PRETRAIN_HELDOUT, tokenizer, dcfg)
    labels = demo.probe_labels(probe_test)
    features = torch.cat(demo.bridge_features(policy, probe_test, dcfg, max_frames=None))
    row.update({f"probe_{k}": context["probes"][k].accuracy(features, labels[k]) for k in ("task", "colour")})
    return row


# ---------------------------------------------------------------------------------------------------------------------
# One run (in a worker process)
# ---------------------------------------------------------------------------------------------------------------------
def run_one(ft, dcfg, data_root: Path, out: Path, threads: int, identity: dict) -> dict:
    """Train (or reuse) one run and evaluate it; writes what was measured to `<run>/study_eval.json` (the numbers
    relative to ε are derived from it by `with_budget`). Output goes to the run's log."""
    from prismatic.models.loaders import load_policy

    torch.set_num_threads(threads)
    run_dir = Path(ft.run_root_dir) / ft.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{ft.run_id}.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        try:
            final, seconds_per_step = demo.run_training(ft)
        except (FloatingPointError, NonFiniteLossError) as exc:
            # a diverged run is a result (deterministic: a re-run would diverge again), not a failure of the study
            final, seconds_per_step, row = None, math.nan, {"diverged": True, "error": str(exc)}
            row.update(dict.fromkeys(("heldout_l1_target", "heldout_l1_pretrain", "final_l_ret", "probe_task",
                                      "probe_colour"), math.nan))
        if final is not None:
            context = torch.load(out / THETA0_EVAL_FILE, weights_only=False)
            policy = load_policy(final).eval()
            row = {"diverged": False, **evaluate_policy(policy, demo.TARGET_SET, context, dcfg, data_root)}
    metrics = read_metrics(run_dir / "metrics.jsonl")
    steps = [int(m["step"]) for m in metrics if demo.RET_KEY in m]
    l_ret = [float(m[demo.RET_KEY]) for m in metrics if demo.RET_KEY in m]
    lam = [float(m[demo.LAMBDA_KEY]) for m in metrics if demo.LAMBDA_KEY in m]
    adam = [float(m[ADAM_KEY.format("llm_lora")]) for m in metrics if ADAM_KEY.format("llm_lora") in m]
    row.update(identity)
    row.update({"run_id": ft.run_id, "max_lambda": max(lam) if lam else math.nan,
                "final_lambda": lam[-1] if lam else math.nan,
                "adam_sqrt_v_llm_lora": adam[-1] if adam else math.nan,
                "seconds_per_step": seconds_per_step, "curve_steps": steps, "curve_l_ret": l_ret,
                "curve_lambda": lam})
    tmp = run_dir / (EVAL_FILE + ".partial")
    tmp.write_text(json.dumps(row, indent=1, allow_nan=True) + "\n")
    tmp.rename(run_dir / EVAL_FILE)
    return row


def with_budget(row: dict, epsilon: float) -> dict:
    """The run's numbers relative to its ε (CRaFT: its own budget; other methods: the study's ε, the same budget
    read as a yardstick): last-10% mean and share above ε of the logged L_ret, final L_ret / ε."""
    if row["diverged"]:
        budget = {"last10_over_eps": math.nan, "share_above_eps": math.nan}
    else:
        budget = budget_metrics(np.asarray(row["curve_l_ret"]), epsilon)
    return {**row, "epsilon": epsilon, **budget, "final_l_ret_over_eps": row["final_l_ret"] / epsilon}


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and report
# ---------------------------------------------------------------------------------------------------------------------
METRICS = (("heldout_l1_target", "Held-out L1 B", ".4f"), ("heldout_l1_pretrain", "Held-out L1 A", ".4f"),
           ("probe_task", "Probe task (A)", ".3f"), ("probe_colour", "Probe colour (A)", ".3f"),
           ("final_l_ret", "Final L_ret", ".3g"), ("final_l_ret_over_eps", "Final L_ret / ε", ".3g"),
           ("last10_over_eps", "Last-10% L_ret / ε", ".3g"),
           ("share_above_eps", "Share > ε", ".3f"), ("max_lambda", "Max λ", ".3g"),
           ("adam_sqrt_v_llm_lora", "√v̂ LLM LoRA", ".2e"))


def group_key(row: dict) -> tuple:
    return row["method"], row["value"]


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean, std (ddof 1; none for n = 1) and n over seeds per (method, knob, value), in first-seen order; runs that
    diverged are counted apart (`diverged`) and left out of the means."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    out = []
    for (method, value), members in groups.items():
        first, finished = members[0], [r for r in members if not r["diverged"]]
        cell = {"method": method, "title": first["title"], "knob": first["knob"], "value": value,
                "default": first["default"], "n": len(finished), "diverged": len(members) - len(finished),
                "seeds": sorted(r["seed"] for r in finished), "epsilon": first["epsilon"]}
        for key, _, _ in METRICS:
            values = np.asarray([r[key] for r in finished], dtype=np.float64)
            cell[key] = float(values.mean()) if len(values) else math.nan
            cell[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        out.append(cell)
    return out


def _cell(mean: float, std: float, spec: str) -> str:
    if math.isnan(mean):
        return "-"
    return format(mean, spec) if math.isnan(std) else f"{format(mean, spec)} ± {format(std, spec)}"


def setting(cell: dict) -> str:
    if cell["knob"] is None:
        return "-"
    return f"{cell['knob']} = {cell['value']:g}" + (" (default)" if cell["default"] else "")


def markdown(cells: list[dict], theta0: dict) -> str:
    header = ["Method", "Setting", "n"] + [title for _, title, _ in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.append("| θ0 (before fine-tuning) | - | 1 | " + " | ".join(
        _cell(theta0.get(k, math.nan), math.nan, s) for k, _, s in METRICS) + " |")
    for c in cells:
        n = f"{c['n']}" + (f" (+{c['diverged']} diverged)" if c["diverged"] else "")
        lines.append(f"| {c['title']} | {setting(c)} | {n} | "
                     + " | ".join(_cell(c[k], c[f"{k}_std"], s) for k, _, s in METRICS) + " |")
    return "\n".join(lines) + "\n"


def write_csv(cells: list[dict], path: Path) -> None:
    keys = ["method", "knob", "value", "default", "n", "diverged"] + [x for k, _, _ in METRICS for x in (k, f"{k}_std")]
    lines = [",".join(keys)] + [",".join("" if c[k] is None else str(c[k]) for k in keys) for c in cells]
    path.write_text("\n".join(lines) + "\n")


def environment(cfg: StudyConfig) -> dict:
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    return {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "platform": platform.platform(),
            "processor": platform.processor(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "numpy": np.__version__, "workers": cfg.workers,
            "threads_per_worker": cfg.threads_per_worker, "git_commit": commit}


# ---------------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------------
def finished_defaults(rows: list[dict], name: str) -> list[dict]:
    """The runs of `name`'s default setting that did not diverge (their curves cover every step)."""
    return [r for r in rows if r["method"] == name and r["default"] and not r["diverged"]]


def figures(rows: list[dict], cells: list[dict], theta0: dict, table: dict[str, Method], epsilon: float,
            out: Path) -> list[Path]:
    plt = rp.pyplot()
    colour = rp.colours(list(table))
    paths = []

    # retention / plasticity front: the task probe (left, the figure) and the final L_ret (right, log: it
    # separates the methods whose probe sits at chance)
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, (key, label) in zip(axes, (("probe_task", "task-probe accuracy on pre-training tasks A (higher: more "
                                                      "retention)"),
                                       ("final_l_ret", "final L_ret vs θ0 (lower: more retention)")), strict=True):
        for name in table:
            members = [c for c in cells if c["method"] == name]
            if not members:
                continue
            swept = sorted(members, key=lambda c: c["value"]) if members[0]["knob"] else members
            ys = [c[key] for c in members]
            ye = [0 if math.isnan(c[f"{key}_std"]) else c[f"{key}_std"] for c in members]
            xe = [0 if math.isnan(c["heldout_l1_target_std"]) else c["heldout_l1_target_std"] for c in members]
            ax.errorbar([c["heldout_l1_target"] for c in members], ys, xerr=xe, yerr=ye, fmt="o", markersize=4,
                        color=colour[name], capsize=2, label=table[name].title)
            if len(members) > 1:  # the sweep as a connected front, in order of the knob, labelled by its value
                order = [members.index(c) for c in swept]
                ax.plot([members[i]["heldout_l1_target"] for i in order], [ys[i] for i in order], color=colour[name],
                        linewidth=0.8, alpha=0.7)
                for i in order:
                    ax.annotate(f"{members[i]['value']:g}", (members[i]["heldout_l1_target"], ys[i]), fontsize=6,
                                xytext=(3, 3), textcoords="offset points", color=colour[name])
        xs = [c["heldout_l1_target"] for c in cells]
        theta0_y = theta0["probe_task"] if key == "probe_task" else None
        if theta0_y is not None and theta0["heldout_l1_target"] > max(xs) + 2 * (max(xs) - min(xs)):
            # θ0 lies far right of every fine-tuned model: a line at its probe accuracy keeps the points readable
            ax.axhline(theta0_y, color="black", linestyle="--", linewidth=1.0,
                       label=f"θ0: probe {theta0_y:.2f}, L1(B) {theta0['heldout_l1_target']:.3f} (off the x range)")
        elif theta0_y is not None:
            ax.plot([theta0["heldout_l1_target"]], [theta0_y], marker="*", color="black", markersize=12,
                    linestyle="none", label="θ0 (before fine-tuning)")
        if key == "final_l_ret":
            ax.set_yscale("log")
            rp.epsilon_line(ax, epsilon)
        ax.set(xlabel="held-out action L1 on the new tasks B (lower: more plasticity)", ylabel=label)
    axes[0].set_title("Task probe on A (mean ± std over seeds)")
    axes[1].set_title("Final L_ret, the same runs (ε sweep: labelled by ε)")
    fig.suptitle("Retention / plasticity; sweeps connected in the order of their knob, labelled by its value")
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    handles, labels = axes[0].get_legend_handles_labels()
    theta0_handles = [(h, lab) for h, lab in zip(handles, labels, strict=True) if lab.startswith("θ0")]
    if theta0_handles:
        axes[0].legend(*zip(*theta0_handles, strict=True), fontsize=7, loc="upper left")
    paths.append(rp.save(fig, out / "front.png"))

    # L_ret curves, one panel per method (default setting), median and band over seeds
    defaults = [name for name in table if any(r["method"] == name and r["default"] for r in rows)]
    cols = 3
    fig, axes = plt.subplots(math.ceil(len(defaults) / cols), cols, figsize=(12, 3 * math.ceil(len(defaults) / cols)),
                             squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, defaults, strict=False):
        curves = [(r["curve_steps"], r["curve_l_ret"]) for r in finished_defaults(rows, name)]
        rp.band(ax, curves, colour[name], "L_ret", log=True)
        rp.epsilon_line(ax, epsilon)
        rp.retention_axes(ax, table[name].title)
        ax.legend(loc="lower right")
    for ax in list(axes.flat)[len(defaults):]:
        ax.set_visible(False)
    paths.append(rp.save(fig, out / "retention_curves.png"))

    # the ε sweep: L_ret over steps per ε, each with its own ε line
    sweep_rows = [r for r in rows if r["method"] == "craft_new"]
    if sweep_rows:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        eps_values = sorted({r["epsilon"] for r in sweep_rows})
        shades = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(eps_values)))
        for eps, shade in zip(eps_values, shades, strict=True):
            curves = [(r["curve_steps"], r["curve_l_ret"]) for r in sweep_rows if r["epsilon"] == eps
                      and not r["diverged"]]
            rp.band(ax, curves, shade, f"ε = {eps:g}", log=True)
            ax.axhline(eps, color=shade, linestyle=":", linewidth=1.0)
        rp.retention_axes(ax, "CRaFT, new dual rule: L_ret per ε (dotted: each ε)")
        ax.legend(fontsize=6)
        paths.append(rp.save(fig, out / "epsilon_sweep.png"))

    # λ per dual rule
    duals = [name for name in defaults if table[name].base == "craft"]
    rows_needed = math.ceil(len(duals) / cols)
    fig, axes = plt.subplots(rows_needed, cols, figsize=(12, 3 * rows_needed), squeeze=False)
    for ax, name in zip(axes.flat, duals, strict=False):
        curves = [(r["curve_steps"], r["curve_lambda"]) for r in finished_defaults(rows, name)]
        rp.band(ax, curves, colour[name], "λ")
        rp.lambda_axes(ax, table[name].title)
        ax.legend(loc="upper right")
    for ax in list(axes.flat)[len(duals):]:
        ax.set_visible(False)
    paths.append(rp.save(fig, out / "lambda_curves.png"))
    return paths


# ---------------------------------------------------------------------------------------------------------------------
def validate(cfg: StudyConfig, table: dict[str, Method]) -> list[str]:
    parse_seeds(cfg.seeds)
    if cfg.workers < 1 or cfg.threads_per_worker < 1:
        raise UserError(f"--workers and --threads_per_worker must be >= 1, got {cfg.workers} and "
                        f"{cfg.threads_per_worker}")
    if not (math.isfinite(cfg.fixed_lambda) and cfg.fixed_lambda >= 0):
        raise UserError(f"--fixed_lambda must be a finite number >= 0, got {cfg.fixed_lambda}")
    if cfg.methods == "all":
        return list(table)
    chosen = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in table]
    if not chosen or bad:
        raise UserError(f"--methods must be 'all' or a comma-separated subset of {', '.join(table)}; got "
                        f"'{cfg.methods}'")
    return chosen


def main(cfg: StudyConfig) -> dict:
    full_table = methods(cfg)
    chosen = validate(cfg, full_table)
    table = {name: full_table[name] for name in chosen}
    started = time.perf_counter()
    dcfg = demo.DemoConfig(output_dir=Path(cfg.output_dir), quick=cfg.quick, threads=cfg.threads_per_worker).resolved()
    out = Path(cfg.output_dir).resolve()
    data_root, run_root = out / "data", out / "runs"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads_per_worker)

    print(f"[study] data and θ0 (the demo's; log: {out / 'logs' / 'theta0.log'})", flush=True)
    with open(out / "logs" / "theta0.log", "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        demo.build_data(dcfg, data_root)
        theta0_path, _ = demo.run_training(demo.theta0_config(dcfg, data_root, run_root))
        configs = demo.finetune_configs(dcfg, data_root, run_root, theta0_path)
        context = theta0_evaluation(dcfg, data_root, theta0_path, out)
        cache_dir = out / "craft_cache"
        if any(m.cache for m in table.values()):
            demo_cache_flags(theta0_path, data_root, cache_dir, num_images_in_input=dcfg.num_images_in_input)
    bases = {"plain": configs["plain"], "craft": configs["craft"]}
    epsilon = float(bases["craft"].craft_retention_budget)
    cfg_tag = json.dumps({k: getattr(dcfg, k) for k in ("finetune_steps", "batch_size", "learning_rate", "lora_rank",
                                                          "craft_retention_budget", "craft_dual_lr", "quick")})

    specs = plan(cfg, table, bases)
    jobs = []
    for spec in specs:
        ft = run_config(spec, table, bases, cfg_tag, cache_dir)
        identity = {"method": spec.method, "title": table[spec.method].title, "seed": spec.seed, "knob": spec.knob,
                    "value": spec.value, "default": spec.default}
        jobs.append((spec, ft, identity, float(ft.craft_retention_budget) if ft.use_craft else epsilon))
    total = len(jobs)
    rows: dict[str, dict] = {}
    pending = []
    for spec, ft, identity, eps in jobs:
        done = Path(ft.run_root_dir) / ft.run_id / EVAL_FILE
        if done.is_file():
            rows[ft.run_id] = with_budget(json.loads(done.read_text()), eps)
        else:
            pending.append((spec, ft, identity, eps))
    print(f"[study] {total} runs ({len(rows)} already done, reused), {cfg.workers} workers x "
          f"{cfg.threads_per_worker} thread(s)", flush=True)

    durations: list[float] = []
    failures: list[str] = []
    if pending:
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=get_context("spawn")) as pool:
            queue = list(pending)
            running = {}

            def submit() -> None:
                spec, ft, identity, eps = queue.pop(0)
                future = pool.submit(run_one, ft, dcfg, data_root, out, cfg.threads_per_worker, identity)
                running[future] = (spec, ft, eps, time.perf_counter())

            for _ in range(min(cfg.workers, len(queue))):
                submit()
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    spec, ft, eps, t0 = running.pop(future)
                    seconds = time.perf_counter() - t0
                    label = f"{spec.method}" + ("" if spec.default else f" {spec.knob}={spec.value:g}")
                    try:
                        row = future.result()
                    except Exception as exc:  # one run's failure must not lose the others: reported at the end
                        failures.append(f"{ft.run_id}: {type(exc).__name__}: {exc} (log: logs/{ft.run_id}.log)")
                        print(f"[study] FAILED {label} seed {spec.seed}: {exc}", flush=True)
                        continue
                    rows[ft.run_id] = row = with_budget(row, eps)
                    durations.append(seconds)
                    left = total - len(rows) - len(failures)
                    eta = left * float(np.mean(durations)) / cfg.workers
                    if row["diverged"]:
                        print(f"[study] [{len(rows)}/{total}] {label} seed {spec.seed}: DIVERGED ({row['error']}; "
                              f"recorded as a result) ({seconds:.0f} s)", flush=True)
                        if queue:
                            submit()
                        continue
                    print(f"[study] [{len(rows)}/{total}] {label} seed {spec.seed}: L1(B) "
                          f"{row['heldout_l1_target']:.4f}, probe task {row['probe_task']:.3f}, L_ret/ε "
                          f"{row['final_l_ret_over_eps']:.3g} ({seconds:.0f} s) | ETA {eta / 60:.1f} min",
                          flush=True)
                    if queue:
                        submit()
    if failures:
        raise UserError(f"{len(failures)} of {total} runs failed (the others are kept; re-run to retry): "
                        + "; ".join(failures))

    ordered = [rows[ft.run_id] for _, ft, _, _ in jobs]
    cells = aggregate(ordered)
    theta0 = dict(context["theta0_row"])
    theta0.update({"final_l_ret_over_eps": 0.0})
    table_md = markdown(cells, theta0)
    (out / "results.md").write_text(table_md)
    write_csv(cells, out / "results.csv")
    record = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "epsilon": epsilon,
              "new_rule_flags": {k: v for k, v in NEW_RULE_FLAGS.items()}, "environment": environment(cfg),
              "theta0": theta0, "cells": cells, "runs": ordered}
    (out / "results.json").write_text(json.dumps(record, indent=1, allow_nan=True) + "\n")
    plots = figures(ordered, cells, theta0, table, epsilon, out)
    print("\n" + table_md)
    print(f"Tables: {out / 'results.md'}, {out / 'results.csv'}, {out / 'results.json'}")
    print("Figures: " + ", ".join(str(p) for p in plots))
    print(f"[study] done in {time.perf_counter() - started:.0f} s")
    return record


@cli_entry("study")
def cli_main(argv: list[str] | None = None) -> dict:
    return main(parse_config(StudyConfig, argv))


if __name__ == "__main__":
    cli_main()
