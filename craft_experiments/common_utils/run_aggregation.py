"""Per-run numbers and their mean ± std over seeds, per group (experiment root, preset, method, suite, shots).

Groups never span experiment roots (a SMOKE root and a real root give separate rows) or model presets; a group
whose evaluations used different episode counts gets no success-rate mean (reported); a seed appearing twice in a
group is refused (`SeedCollisionError`), never averaged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from run_reading import (
    KEY_ACTION_LOSS,
    KEY_CONFLICT_NULL,
    KEY_CONFLICT_RATIO,
    KEY_LAMBDA,
    KEY_RETENTION_LOSS,
    KEY_RETENTION_MONITOR,
    Issue,
    RunRecord,
    _to_float,
)

from prismatic.training.method_label import CRAFT_DEFAULTS, _as_bool, method_label

SUITE_ORDER = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
SUITE_TITLES = {"libero_spatial": "Spatial", "libero_object": "Object", "libero_goal": "Goal", "libero_10": "Long"}
GROUP_KEYS = ("experiment", "root", "preset", "method", "suite", "shots")


class SeedCollisionError(ValueError):
    """Two runs of one group have the same seed: the parser refuses to average them."""


@dataclass(frozen=True)
class Metric:
    key: str  # column stem in the CSV
    title: str  # column title in Markdown
    latex: str  # column title in LaTeX
    fmt: str  # number format in Markdown / LaTeX


METRICS = (
    Metric("success_pct", "Success (%)", "Success (\\%)", ".1f"),
    # only with EVAL_EVERY_KTH_CHECKPOINT: the best of the evaluated checkpoints, selected on the test episodes
    Metric("best_success_pct", "Best-ckpt success (%)", "Best-ckpt success (\\%)", ".1f"),
    Metric("final_action_loss", "Final L_act", "Final $L_{act}$", ".4f"),
    Metric("final_retention_loss", "Final L_ret", "Final $L_{ret}$", ".4f"),
    Metric("mean_conflict_ratio", "Conflict ratio", "Conflict ratio", ".3f"),
    # beside it, its null: the same share between unrelated gradients (about 0.5), so a ratio can be read
    Metric("mean_conflict_null", "Conflict null", "Conflict null", ".3f"),
    Metric("final_lambda", "Final λ", "Final $\\lambda$", ".3f"),
    Metric("drift_retention", "Drift L_ret", "Drift $L_{ret}$", ".4f"),
    Metric("drift_cka_aq", "CKA (AQ)", "CKA (AQ)", ".3f"),
    Metric("drift_probe_aq", "Probe acc. (AQ)", "Probe acc.\\ (AQ)", ".3f"),
)
METRIC_KEYS = tuple(m.key for m in METRICS)


# ---------------------------------------------------------------------------------------------------------------------
# Per-run numbers
# ---------------------------------------------------------------------------------------------------------------------
def _suite_of(config: dict) -> str:
    name = str(config.get("dataset_name", ""))
    return name[: -len("_no_noops")] if name.endswith("_no_noops") else name


def _root_of(record: RunRecord) -> str:
    root = record.config.get("run_root_dir") if record.config else None
    if root:
        return str(root)
    return str(Path(record.source).parent) if not record.source.startswith("wandb:") else record.source


def _experiment_of(record: RunRecord) -> str:
    root = record.config.get("run_root_dir") if record.config else None
    if root:
        return Path(str(root)).name
    return Path(record.source).parent.name if not record.source.startswith("wandb:") else "wandb"


def _series(metrics: list[dict] | None, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of one metric key over a run (records without the key are skipped)."""
    if not metrics:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    pairs = [(r["step"], _to_float(r[key])) for r in metrics if key in r and r[key] is not None]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    steps, values = zip(*pairs, strict=True)
    return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


def run_keys(record: RunRecord) -> dict | None:
    """Group keys of a usable run (experiment, method, suite, shots), its seed, name and ε (NaN without CRaFT)."""
    if not record.usable or record.config is None:
        return None
    config = record.config
    shots = config.get("num_demos_per_task")
    use_craft = _as_bool(config.get("use_craft")) or str(config.get("retention_method")).lower() == "craft"
    return {
        "experiment": _experiment_of(record),
        "root": _root_of(record),
        "preset": str(config.get("model_preset", "real")),
        "method": method_label(config),
        "suite": _suite_of(config),
        "shots": "all" if shots is None else str(shots),
        "seed": config.get("seed"),
        "run": record.name,
        "epsilon": float(config.get("craft_retention_budget", CRAFT_DEFAULTS["craft_retention_budget"]))
        if use_craft else math.nan,
    }


def summarize_run(record: RunRecord, final_window: int = 1) -> dict | None:
    """Group keys and per-run numbers (NaN = not available); None for a run with an error. Non-finite numbers are
    reported in `record.issues` and left out (NaN). Call once per record (it appends to `record.issues`)."""
    if final_window < 1:
        raise ValueError(f"final_window must be >= 1, got {final_window}")
    row = run_keys(record)
    if row is None:
        return None
    suite = row["suite"]
    row["success_pct"] = math.nan
    if record.eval_summary is not None:
        evaluated = record.eval_summary.get("task_suite_name")
        if evaluated and suite and evaluated != suite:
            record.report("warning", f"evaluated on '{evaluated}' but trained on '{suite}': success rate left out")
        else:
            row["success_pct"] = 100.0 * float(record.eval_summary["success_rate"])

    def final(key: str) -> float:
        _, values = _series(record.metrics, key)
        if values.size == 0:
            return math.nan
        tail = values[-final_window:]
        if not np.all(np.isfinite(tail)):
            record.report("warning", f"final '{key}' is not finite ({tail.tolist()}): left out")
            return math.nan
        return float(tail.mean())

    def mean_over_steps(key: str) -> float:
        _, values = _series(record.metrics, key)
        if values.size == 0:
            return math.nan
        if not np.all(np.isfinite(values)):
            record.report("warning", f"'{key}' has non-finite values: its mean is left out")
            return math.nan
        return float(values.mean())

    row.update(best_checkpoint(record, row["success_pct"], suite))
    row["eval_episodes"] = (int(record.eval_summary["num_episodes"]) if record.eval_summary is not None
                            and "num_episodes" in record.eval_summary else None)
    row["final_action_loss"] = final(KEY_ACTION_LOSS)
    # the retention monitor's value when the run has one (same measure for every method), else CRaFT's own
    has_monitor = _series(record.metrics, KEY_RETENTION_MONITOR)[1].size > 0
    row["final_retention_loss"] = final(KEY_RETENTION_MONITOR if has_monitor else KEY_RETENTION_LOSS)
    row["mean_conflict_ratio"] = mean_over_steps(KEY_CONFLICT_RATIO)
    row["mean_conflict_null"] = mean_over_steps(KEY_CONFLICT_NULL)
    row["final_lambda"] = final(KEY_LAMBDA)
    row.update(drift_numbers(record.drift))
    return row


def best_checkpoint(record: RunRecord, final_pct: float, suite: str) -> dict[str, Any]:
    """Best success over the final and the earlier evaluated checkpoints (NaN unless earlier ones were evaluated):
    `best_success_pct`, `best_step`, `checkpoints_evaluated`. Reported apart from the final checkpoint's number."""
    rates = {step: 100.0 * float(s["success_rate"]) for step, s in record.step_evals.items()
             if not s.get("task_suite_name") or s.get("task_suite_name") == suite}
    if not rates:
        return {"best_success_pct": math.nan, "best_step": None, "checkpoints_evaluated": 1 if final_pct == final_pct
                else 0}
    final_step = (record.config or {}).get("max_steps")
    if not math.isnan(final_pct) and isinstance(final_step, int):
        rates[final_step] = final_pct
    best_step = max(sorted(rates), key=lambda s: rates[s])  # the earliest of equal bests
    return {"best_success_pct": rates[best_step], "best_step": best_step, "checkpoints_evaluated": len(rates)}


def drift_numbers(report: dict | None) -> dict[str, float]:
    """From measure_drift.py's report: L_ret of CRaFT's default concat anchor, linear CKA and the task-probe accuracy
    of the fine-tuned model on the ActionQuery features at layer M = L (NaN when not measured)."""
    out = {"drift_retention": math.nan, "drift_cka_aq": math.nan, "drift_probe_aq": math.nan}
    if not report:
        return out
    try:
        anchor = report["craft_default_anchor"]
        aq = report["groups"]["aq"]
        M = int(anchor["aq_layer"])
        out["drift_retention"] = float(anchor["L_ret_concat"])
        out["drift_cka_aq"] = float(aq["cka"][M])
        probe = aq["probe_accuracy_finetuned"][M]
        out["drift_probe_aq"] = float(probe) if probe is not None else math.nan
    except (KeyError, IndexError, TypeError, ValueError):
        pass
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def _group_sort_key(key: tuple) -> tuple:
    experiment, root, preset, method, suite, shots = key
    suite_rank = SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)
    method_rank = {"baseline": 0, "craft": 1}.get(method, 2)
    shots_rank = (0, 0) if shots == "all" else (1, int(shots) if str(shots).isdigit() else 0)
    return (experiment, root, preset, suite_rank, suite, shots_rank, method_rank, method)


def aggregate_runs(rows: Iterable[dict], ddof: int = 1) -> tuple[list[dict], list[Issue]]:
    """Mean and std (numpy, `ddof`) of every metric per (experiment, root, preset, method, suite, shots) group.

    Each output row holds the group keys, `runs`, `seeds`, and for every metric `<m>_mean`, `<m>_std`, `<m>_n`
    (NaN values, i.e. missing or left-out numbers, are not counted). A seed appearing twice in a group raises
    SeedCollisionError.
    """
    if ddof < 0:
        raise ValueError(f"ddof must be >= 0, got {ddof}")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in GROUP_KEYS), []).append(row)
    out, issues = [], []
    for key in sorted(groups, key=_group_sort_key):
        members = groups[key]
        seeds = [m["seed"] for m in members]
        dupes = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if dupes:
            raise SeedCollisionError(
                f"seed(s) {dupes} appear in several runs of group {'/'.join(map(str, key))} "
                f"({[m['run'] for m in members]}) — remove or move the extra runs (a changed flag the run id does not "
                "encode?) or read the roots separately")
        episodes = {m.get("eval_episodes") for m in members if m.get("eval_episodes") is not None}
        if len(episodes) > 1:
            issues.append(Issue("/".join(map(str, key)), "error", f"evaluations with different episode counts "
                                f"{sorted(episodes)} in one group: success rate not averaged"))
            members = [{**m, "success_pct": math.nan} for m in members]
        agg: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        agg["runs"] = len(members)
        agg["episodes"] = episodes.pop() if len(episodes) == 1 else ""
        agg["seeds"] = " ".join(str(s) for s in sorted(seeds, key=str))
        epsilons = {m["epsilon"] for m in members if not math.isnan(m["epsilon"])}
        agg["epsilon"] = epsilons.pop() if len(epsilons) == 1 else math.nan
        for metric in METRIC_KEYS:
            values = np.array([m[metric] for m in members], dtype=np.float64)
            values = values[~np.isnan(values)]
            agg[f"{metric}_n"] = int(values.size)
            agg[f"{metric}_mean"] = float(np.mean(values)) if values.size else math.nan
            agg[f"{metric}_std"] = float(np.std(values, ddof=ddof)) if values.size > ddof else math.nan
        out.append(agg)
    return out, issues


