"""Collect CRaFT experiment runs and turn them into tables (CSV, Markdown, LaTeX/booktabs) and training-curve plots.

Sources:
  * run directories written by `vla-scripts/finetune.py` (`{run_root}/{run_id}/config.yaml`, `metrics.jsonl`) with
    their LIBERO evaluation (`{run_root}/{run_id}/eval/summary.json`, written by the experiment scripts);
  * optionally the wandb API (`--wandb_project`, `--wandb_entity`): config and history of every run of the project
    (success rates only if the run summary carries one).

Runs are grouped by experiment (the run root's folder name: table1 / fewshot / ablations), method (baseline, craft,
or a CRaFT variant such as `craft-noproj`, `craft-eps0.05`, derived from the resolved config, not from the run name),
suite and few-shot demos per task; within a group the seeds are aggregated as mean and std (ddof given by `--ddof`,
default 1: the sample std over seeds; a group with fewer than ddof + 1 values has no std).

Per run: success rate (%) from summary.json; final action loss (`VLA Train/Loss`, the L1 action loss) and final
retention loss (`CRaFT/Retention Loss`), each the mean of the last `--final_window` logged values; mean conflict ratio
(`CRaFT/Conflict Ratio` averaged over all logged steps); final λ (`CRaFT/Lambda`).

Bad input is reported, never silently averaged: a run without config, an empty or unreadable metrics file (a
truncated JSON line, steps going backwards), a missing or inconsistent summary.json, an unfinished training, a
non-finite final value. Each problem is one line in `issues.txt` (and on stderr); the affected numbers are left out
and every table shows how many values each mean is made of. `--strict` turns any problem into exit status 1.

    python craft_experiments/common_utils/log_parser.py --runs_dir runs/craft_experiments/table1 \
        --output_dir results/ --generate_latex_table
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_SUMMARY = Path("eval") / "summary.json"
CHECKPOINT_SUFFIX = "_chkpt"
COMPLETE_MARKER = "COMPLETE"

KEY_ACTION_LOSS = "VLA Train/Loss"
KEY_RETENTION_LOSS = "CRaFT/Retention Loss"
KEY_LAMBDA = "CRaFT/Lambda"
KEY_CONFLICT_RATIO = "CRaFT/Conflict Ratio"
CURVE_KEYS = (KEY_ACTION_LOSS, KEY_RETENTION_LOSS, KEY_LAMBDA, KEY_CONFLICT_RATIO)

SUITE_ORDER = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
SUITE_TITLES = {"libero_spatial": "Spatial", "libero_object": "Object", "libero_goal": "Goal", "libero_10": "Long"}
# LLM depth per model preset: the default anchor layers are m = L // 2 and M = L (finetune.py's defaults).
PRESET_LLM_LAYERS = {"real": 24, "tiny": 4}
CRAFT_DEFAULTS = {"craft_retention_budget": 0.1, "craft_dual_lr": 0.01, "craft_anchor_type": "concat",
                  "craft_anchor_source": "online"}

GROUP_KEYS = ("experiment", "method", "suite", "shots")
# A conflict ratio above this share is read as strong representation collapse (PROMISED_INTERFACE.md).
STRONG_CONFLICT = 0.3


@dataclass(frozen=True)
class Metric:
    key: str  # column stem in the CSV
    title: str  # column title in Markdown
    latex: str  # column title in LaTeX
    fmt: str  # number format in Markdown / LaTeX


METRICS = (
    Metric("success_pct", "Success (%)", "Success (\\%)", ".1f"),
    Metric("final_action_loss", "Final L_act", "Final $L_{act}$", ".4f"),
    Metric("final_retention_loss", "Final L_ret", "Final $L_{ret}$", ".4f"),
    Metric("mean_conflict_ratio", "Conflict ratio", "Conflict ratio", ".3f"),
    Metric("final_lambda", "Final λ", "Final $\\lambda$", ".3f"),
)
METRIC_KEYS = tuple(m.key for m in METRICS)


class RunDataError(ValueError):
    """A run file that exists but cannot be used (the message names the file, the line and what is wrong)."""


@dataclass
class Issue:
    run: str
    severity: str  # "error": the run is left out entirely; "warning": some of its numbers are left out
    message: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.run}: {self.message}"


@dataclass
class RunRecord:
    """One run as read from disk or wandb; `None` fields were missing or unusable (see `issues`)."""

    name: str
    source: str
    config: dict | None = None
    metrics: list[dict] | None = None
    eval_summary: dict | None = None
    training_complete: bool | None = None
    issues: list[Issue] = field(default_factory=list)

    def report(self, severity: str, message: str) -> None:
        self.issues.append(Issue(self.name, severity, message))

    @property
    def usable(self) -> bool:
        return not any(i.severity == "error" for i in self.issues)


# ---------------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------------
def _to_float(value: Any) -> float:
    """Metric values are numbers, or strings like "nan" / "inf" (JSON has no non-finite numbers)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(value)  # "nan", "inf", "-inf"; anything else raises ValueError
    raise TypeError(f"not a number: {value!r}")


def read_metrics_jsonl(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file. Raises RunDataError on an empty file, a line that is not a JSON object with
    an integer `step` (a truncated last line included: the run was cut while writing), or steps that go backwards."""
    path = Path(path)
    records: list[dict] = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunDataError(f"{path} line {lineno} is not valid JSON ({exc.msg}; truncated write?): "
                                   f"{line.strip()[:120]!r}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise RunDataError(f"{path} line {lineno}: expected an object with an integer 'step', got "
                                   f"{line.strip()[:120]!r}")
            if records and record["step"] < records[-1]["step"]:
                raise RunDataError(f"{path} line {lineno}: step {record['step']} after step {records[-1]['step']} "
                                   "(steps go backwards: two runs appended to one file?)")
            records.append(record)
    if not records:
        raise RunDataError(f"{path} is empty (no logged step)")
    return records


def read_eval_summary(path: Path) -> dict:
    """An evaluation summary.json, checked: success_rate in [0, 1], num_episodes > 0, consistent with num_successes."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunDataError(f"{path} is not valid JSON ({exc.msg})") from exc
    if not isinstance(summary, dict):
        raise RunDataError(f"{path}: expected a JSON object")
    missing = [k for k in ("task_suite_name", "num_episodes", "num_successes", "success_rate") if k not in summary]
    if missing:
        raise RunDataError(f"{path} lacks keys {missing}")
    episodes, successes, rate = summary["num_episodes"], summary["num_successes"], summary["success_rate"]
    if not isinstance(episodes, int) or episodes <= 0:
        raise RunDataError(f"{path}: num_episodes must be a positive integer, got {episodes!r}")
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise RunDataError(f"{path}: success_rate must be a fraction in [0, 1], got {rate!r}")
    if not isinstance(successes, int) or abs(successes / episodes - rate) > 1e-6:
        raise RunDataError(f"{path}: success_rate {rate} != num_successes {successes} / num_episodes {episodes}")
    return summary


def read_config(path: Path) -> dict:
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RunDataError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise RunDataError(f"{path}: expected a mapping of flags, got {type(config).__name__}")
    return config


def _training_complete(config: dict, metrics: list[dict], checkpoint: Path | None) -> tuple[bool, str]:
    """Finished = the final checkpoint is complete, or (checkpoints not at hand) the log reaches max_steps."""
    max_steps = config.get("max_steps")
    if not isinstance(max_steps, int):
        return True, ""
    if checkpoint is not None and (checkpoint / COMPLETE_MARKER).is_file():
        return True, ""
    steps = [r["step"] for r in metrics]
    gap = int(statistics.median(np.diff(steps))) if len(steps) > 1 else 1
    if steps[-1] >= max_steps - max(gap, 1):
        return True, ""
    return False, f"training unfinished: last logged step {steps[-1]} of max_steps {max_steps}" + (
        f" and no complete final checkpoint {checkpoint.name}" if checkpoint is not None else "")


def load_run_dir(run_dir: Path) -> RunRecord:
    """Read one run directory; every problem is recorded in `record.issues` (nothing raises for bad run data)."""
    run_dir = Path(run_dir)
    record = RunRecord(name=run_dir.name, source=str(run_dir))
    config_path, metrics_path = run_dir / CONFIG_FILE, run_dir / METRICS_FILE
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        record.report("error", f"empty run directory {run_dir} (no {CONFIG_FILE}, {METRICS_FILE} or eval)")
        return record
    if not config_path.is_file():
        record.report("error", f"no {CONFIG_FILE} in {run_dir}: cannot tell method, suite or seed")
    else:
        try:
            record.config = read_config(config_path)
        except RunDataError as exc:
            record.report("error", str(exc))
    if not metrics_path.is_file():
        record.report("warning", f"no {METRICS_FILE} in {run_dir}: training metrics left out")
    else:
        try:
            record.metrics = read_metrics_jsonl(metrics_path)
        except RunDataError as exc:
            record.report("warning", f"training metrics left out: {exc}")
    summary_path = run_dir / EVAL_SUMMARY
    if not summary_path.is_file():
        record.report("warning", f"no {EVAL_SUMMARY} (not evaluated yet?): success rate left out")
    else:
        try:
            record.eval_summary = read_eval_summary(summary_path)
        except RunDataError as exc:
            record.report("warning", f"success rate left out: {exc}")
    if record.config is not None and record.metrics is not None:
        max_steps = record.config.get("max_steps")
        chkpt = run_dir.parent / f"{run_dir.name}--{max_steps}{CHECKPOINT_SUFFIX}" if max_steps is not None else None
        complete, why = _training_complete(record.config, record.metrics, chkpt)
        record.training_complete = complete
        if not complete:
            record.report("error", why)
    return record


# Files finetune.py writes into a run directory; a folder holding any of them is a run (perhaps a broken one).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "dataset_statistics.json", "few_shot_episodes.json")
NOT_RUN_DIRS = ("logs", "wandb", "eval", "plots", "results", "craft_cache")


def _is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in RUN_FILES) or (path / EVAL_SUMMARY).is_file()


def _skipped_dir(path: Path) -> bool:
    name = path.name
    return name.endswith(CHECKPOINT_SUFFIX) or name.startswith(".") or ".partial-" in name or name in NOT_RUN_DIRS


def discover_runs(runs_dir: Path) -> tuple[list[RunRecord], list[Issue]]:
    """Every run directory below `runs_dir` (or `runs_dir` itself), read with `load_run_dir`.

    Checkpoint folders, `logs/`, `wandb/` and moved-aside `*.partial-*` folders are not runs. An empty folder, or a
    folder with checkpoints but no run directory beside them, is reported (it is a run that left nothing usable).
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"--runs_dir '{runs_dir}' does not exist or is not a directory")
    records: list[RunRecord] = []
    issues: list[Issue] = []
    if _is_run_dir(runs_dir):
        return [load_run_dir(runs_dir)], issues
    stack = [runs_dir]
    while stack:
        folder = stack.pop()
        children = sorted(p for p in folder.iterdir() if p.is_dir())
        checkpoint_runs = {p.name.rsplit("--", 1)[0] for p in children
                           if p.name.endswith(CHECKPOINT_SUFFIX) and "--" in p.name}
        for run_name in sorted(checkpoint_runs):
            if not (folder / run_name).is_dir():
                issues.append(Issue(run_name, "error", f"checkpoints {folder / run_name}--*{CHECKPOINT_SUFFIX} have "
                                    f"no run directory {folder / run_name} (no config, metrics or eval)"))
        for child in children:
            if _skipped_dir(child):
                continue
            if _is_run_dir(child) or child.name in checkpoint_runs or not any(child.iterdir()):
                records.append(load_run_dir(child))  # an empty folder is reported as an empty run directory
            else:
                stack.append(child)
    return sorted(records, key=lambda r: r.source), issues


# ---------------------------------------------------------------------------------------------------------------------
# wandb
# ---------------------------------------------------------------------------------------------------------------------
def _unwrap_wandb_config(config: dict) -> dict:
    # older wandb APIs return {"key": {"value": v, "desc": ...}}
    return {k: (v["value"] if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v else v)
            for k, v in config.items() if not k.startswith("_")}


def load_wandb_runs(project: str, entity: str | None = None, api_factory: Callable[[], Any] | None = None
                    ) -> list[RunRecord]:
    """Runs of a wandb project as RunRecords (config + history of the metric keys; success rate if the run summary
    holds `success_rate` / `Eval/Success Rate`). `wandb` is imported only here; an unreachable API (offline, no login)
    raises RuntimeError saying so. `api_factory` replaces `wandb.Api` (tests)."""
    if api_factory is None:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError("--wandb_project needs the `wandb` package (pip install wandb); or read local run "
                               "directories with --runs_dir") from exc
        api_factory = wandb.Api
    path = f"{entity}/{project}" if entity else project
    try:
        api = api_factory()
        runs = list(api.runs(path))
    except Exception as exc:  # network, auth and "project not found" errors all end here
        raise RuntimeError(f"could not read wandb project '{path}' ({type(exc).__name__}: {exc}). Offline or not "
                           "logged in? Run `wandb login`, or use --runs_dir with the local run directories "
                           "(metrics.jsonl is written next to every wandb run).") from exc
    records = []
    for run in runs:
        record = RunRecord(name=str(run.name), source=f"wandb:{path}/{run.id}")
        record.config = _unwrap_wandb_config(dict(run.config))
        rows = []
        for row in run.scan_history():
            step = row.get("_step")
            if step is None:
                continue
            values = {k: row[k] for k in CURVE_KEYS if row.get(k) is not None}
            if values:
                rows.append({"step": int(step), **values})
        rows.sort(key=lambda r: r["step"])
        if rows:
            record.metrics = rows
            complete, why = _training_complete(record.config, rows, None)
            record.training_complete = complete
            if not complete:
                record.report("error", why)
        else:
            record.report("warning", "wandb history has no training metrics: left out")
        summary = dict(getattr(run.summary, "_json_dict", None) or run.summary)
        rate = summary.get("success_rate", summary.get("Eval/Success Rate"))
        if rate is not None:
            record.eval_summary = {"task_suite_name": summary.get("task_suite_name"), "success_rate": float(rate)}
        else:
            record.report("warning", "wandb run summary has no success rate: success rate left out")
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Per-run numbers
# ---------------------------------------------------------------------------------------------------------------------
def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _num(value: Any) -> str:
    return f"{float(value):g}"


def method_label(config: dict) -> str:
    """baseline | craft | craft-<variant parts> | align | freeze ..., from the resolved training config."""
    retention = str(config.get("retention_method") or "none").lower()
    use_craft = _as_bool(config.get("use_craft", False)) or retention == "craft"
    freeze = _as_bool(config.get("freeze_vision_backbone", False))
    if not use_craft:
        label = retention if retention not in ("none", "craft") else ("freeze" if freeze else "baseline")
        if freeze and label != "freeze":
            label += "+freeze"
        return label
    parts = []
    if not _as_bool(config.get("craft_enable_projection", True)):
        parts.append("noproj")
    if not _as_bool(config.get("craft_enable_dual", True)):
        fixed = config.get("craft_fixed_lambda")
        parts.append(f"fixlam{_num(fixed if fixed is not None else config.get('craft_init_lambda', 0.0))}")
    anchor = config.get("craft_anchor_type", "concat")
    if anchor != CRAFT_DEFAULTS["craft_anchor_type"]:
        parts.append(f"anchor_{anchor}")
    budget = config.get("craft_retention_budget", 0.1)
    if not math.isclose(float(budget), CRAFT_DEFAULTS["craft_retention_budget"]):
        parts.append(f"eps{_num(budget)}")
    dual_lr = config.get("craft_dual_lr", 0.01)
    if not math.isclose(float(dual_lr), CRAFT_DEFAULTS["craft_dual_lr"]):
        parts.append(f"dlr{_num(dual_lr)}")
    depth = PRESET_LLM_LAYERS.get(str(config.get("model_preset", "real")))
    raw, aq = config.get("craft_raw_layer"), config.get("craft_aq_layer")
    if raw is not None and (depth is None or int(raw) != depth // 2):
        parts.append(f"m{raw}")
    if aq is not None and (depth is None or int(aq) != depth):
        parts.append(f"M{aq}")
    if config.get("craft_anchor_source", "online") != CRAFT_DEFAULTS["craft_anchor_source"]:
        parts.append(str(config.get("craft_anchor_source")))
    if config.get("craft_snapshot_path"):
        parts.append("snapshot")
    label = "-".join(["craft", *parts])
    return label + ("+freeze" if freeze else "")


def _suite_of(config: dict) -> str:
    name = str(config.get("dataset_name", ""))
    return name[: -len("_no_noops")] if name.endswith("_no_noops") else name


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

    row["final_action_loss"] = final(KEY_ACTION_LOSS)
    row["final_retention_loss"] = final(KEY_RETENTION_LOSS)
    row["mean_conflict_ratio"] = mean_over_steps(KEY_CONFLICT_RATIO)
    row["final_lambda"] = final(KEY_LAMBDA)
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------------------------------
def _group_sort_key(key: tuple) -> tuple:
    experiment, method, suite, shots = key
    suite_rank = SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)
    method_rank = {"baseline": 0, "craft": 1}.get(method, 2)
    shots_rank = (0, 0) if shots == "all" else (1, int(shots) if str(shots).isdigit() else 0)
    return (experiment, suite_rank, suite, shots_rank, method_rank, method)


def aggregate_runs(rows: Iterable[dict], ddof: int = 1) -> tuple[list[dict], list[Issue]]:
    """Mean and std (numpy, `ddof`) of every metric per (experiment, method, suite, shots) group.

    Each output row holds the group keys, `runs`, `seeds`, and for every metric `<m>_mean`, `<m>_std`, `<m>_n`
    (NaN values, i.e. missing or left-out numbers, are not counted). A seed appearing twice in a group is reported.
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
            issues.append(Issue("/".join(map(str, key)), "warning", f"seed(s) {dupes} appear in several runs of "
                                f"this group ({[m['run'] for m in members]}); all of them are averaged"))
        agg: dict[str, Any] = dict(zip(GROUP_KEYS, key, strict=True))
        agg["runs"] = len(members)
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


# ---------------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------------
def aggregate_columns() -> list[str]:
    cols = [*GROUP_KEYS, "runs", "seeds", "epsilon"]
    for metric in METRIC_KEYS:
        cols += [f"{metric}_mean", f"{metric}_std", f"{metric}_n"]
    return cols


RUN_COLUMNS = [*GROUP_KEYS, "seed", "run", "epsilon", *METRIC_KEYS]


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def write_csv(rows: Sequence[dict], path: Path, columns: Sequence[str]) -> Path:
    """CSV with full-precision floats; missing values are empty cells."""
    path = Path(path)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
    return path


def format_cell(row: dict, metric: Metric, pm: str = " ± ") -> str:
    """'mean ± std' in the metric's format; '–' when no value; '(n=k)' when fewer values than runs."""
    n = row[f"{metric.key}_n"]
    if n == 0:
        return "–"
    text = format(row[f"{metric.key}_mean"], metric.fmt)
    std = row[f"{metric.key}_std"]
    if not math.isnan(std):
        text += pm + format(std, metric.fmt)
    if n < row["runs"]:
        text += f" (n={n})"
    return text


def markdown_table(rows: Sequence[dict], ddof: int = 1) -> str:
    header = ["Experiment", "Method", "Suite", "Shots", "Runs", *[m.title for m in METRICS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["experiment"], row["method"], row["suite"], row["shots"], str(row["runs"]),
                 *[format_cell(row, m) for m in METRICS]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"mean ± std over seeds (std with ddof={ddof}); (n=k): only k runs had that number.")
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    for char, repl in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("$", "\\$"), ("#", "\\#"),
                       ("_", "\\_"), ("{", "\\{"), ("}", "\\}")):
        text = text.replace(char, repl)
    return text


def _latex_cell(row: dict, metric: Metric) -> str:
    return format_cell(row, metric, pm=" $\\pm$ ").replace("–", "--")


def latex_metrics_table(rows: Sequence[dict], ddof: int = 1, caption: str | None = None) -> str:
    """Every group and every metric, booktabs style."""
    caption = caption or (f"CRaFT experiments: mean $\\pm$ std over seeds (ddof={ddof}).")
    cols = "llll" + "r" * len(METRICS)
    head = ["Experiment", "Method", "Suite", "Shots", *[m.latex for m in METRICS]]
    lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\begin{{tabular}}{{{cols}}}", "\\toprule",
             " & ".join(head) + " \\\\", "\\midrule"]
    for row in rows:
        cells = [latex_escape(str(row[k])) for k in GROUP_KEYS] + [_latex_cell(row, m) for m in METRICS]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{caption}}}", "\\label{tab:craft-metrics}",
              "\\end{table}"]
    return "\n".join(lines) + "\n"


def latex_success_table(rows: Sequence[dict], ddof: int = 1, caption: str | None = None) -> str:
    """Table-1 layout: one row per (experiment, method, shots), one column per suite, success rate mean ± std, and
    the average of the suite means when every suite of the table has a value."""
    suites = [s for s in SUITE_ORDER if any(r["suite"] == s for r in rows)]
    suites += sorted({r["suite"] for r in rows} - set(suites))
    metric = METRICS[0]
    table: dict[tuple, dict[str, dict]] = {}
    for row in rows:
        table.setdefault((row["experiment"], row["method"], row["shots"]), {})[row["suite"]] = row
    caption = caption or (f"LIBERO success rate (\\%), mean $\\pm$ std over seeds (ddof={ddof}).")
    lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\begin{{tabular}}{{lll{'r' * (len(suites) + 1)}}}",
             "\\toprule",
             " & ".join(["Experiment", "Method", "Shots", *[SUITE_TITLES.get(s, latex_escape(s)) for s in suites],
                         "Avg."]) + " \\\\", "\\midrule"]
    for key in sorted(table, key=lambda k: _group_sort_key((k[0], k[1], suites[0] if suites else "", k[2]))):
        by_suite = table[key]
        cells = [latex_escape(str(k)) for k in key]
        means = []
        for suite in suites:
            row = by_suite.get(suite)
            cells.append(_latex_cell(row, metric) if row else "--")
            if row and row[f"{metric.key}_n"]:
                means.append(row[f"{metric.key}_mean"])
        cells.append(format(float(np.mean(means)), metric.fmt) if means and len(means) == len(suites) else "--")
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", f"\\caption{{{caption}}}", "\\label{tab:craft-success}",
              "\\end{table}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------
def plot_training_curves(records: Sequence[RunRecord], output_dir: Path) -> list[Path]:
    """One PNG per (experiment, suite, shots): action loss, retention loss with ε as a dashed horizontal line per
    CRaFT method, λ and conflict ratio against the step; one colour per method, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[tuple, list[tuple[dict, RunRecord]]] = {}
    for record in records:
        row = run_keys(record)
        if row is None or not record.metrics:
            continue
        figures.setdefault((row["experiment"], row["suite"], row["shots"]), []).append((row, record))
    panels = ((KEY_ACTION_LOSS, "action loss $L_{act}$"), (KEY_RETENTION_LOSS, "retention loss $L_{ret}$"),
              (KEY_LAMBDA, "$\\lambda$"), (KEY_CONFLICT_RATIO, "conflict ratio"))
    written = []
    for (experiment, suite, shots), members in sorted(figures.items()):
        methods = sorted({row["method"] for row, _ in members},
                         key=lambda m: ({"baseline": 0, "craft": 1}.get(m, 2), m))
        colours = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
        for ax, (key, title) in zip(axes.flat, panels, strict=True):
            labelled = set()
            for row, record in sorted(members, key=lambda x: (x[0]["method"], str(x[0]["seed"]))):
                steps, values = _series(record.metrics, key)
                if steps.size == 0:
                    continue
                method = row["method"]
                ax.plot(steps, values, color=colours[method], linewidth=1.2, alpha=0.85,
                        label=method if method not in labelled else None)
                labelled.add(method)
            if key == KEY_CONFLICT_RATIO:
                ax.axhline(STRONG_CONFLICT, color="grey", linestyle=":", linewidth=1.0,
                           label=f"{STRONG_CONFLICT:.0%}: strong collapse")
            if key == KEY_RETENTION_LOSS:
                for method in methods:
                    eps = {r["epsilon"] for r, _ in members if r["method"] == method and not math.isnan(r["epsilon"])}
                    for value in sorted(eps):
                        ax.axhline(value, color=colours[method], linestyle="--", linewidth=1.0,
                                   label=f"ε = {value:g} ({method})")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{experiment}: {suite}" + ("" if shots == "all" else f", {shots} demos/task"))
        fig.tight_layout()
        path = output_dir / f"{experiment}_{suite}_{'full' if shots == 'all' else shots + 'shot'}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Results:
    records: list[RunRecord]
    run_rows: list[dict]
    aggregate: list[dict]
    issues: list[Issue]


def collect(runs_dirs: Sequence[Path] = (), wandb_project: str | None = None, wandb_entity: str | None = None,
            ddof: int = 1, final_window: int = 1, include_incomplete: bool = False,
            api_factory: Callable[[], Any] | None = None) -> Results:
    """Read every source, summarise each run, aggregate per group; all problems end up in `Results.issues`."""
    records: list[RunRecord] = []
    issues: list[Issue] = []
    for runs_dir in runs_dirs:
        found, dir_issues = discover_runs(Path(runs_dir))
        records += found
        issues += dir_issues
    if wandb_project:
        # A run present both locally and in wandb is read once, from disk (which also has its evaluation).
        local_names = {r.name for r in records}
        for record in load_wandb_runs(wandb_project, wandb_entity, api_factory=api_factory):
            if record.name not in local_names:
                records.append(record)
    if include_incomplete:
        for record in records:
            for issue in record.issues:
                if issue.message.startswith("training unfinished"):
                    issue.severity = "warning"
    run_rows = []
    for record in records:
        row = summarize_run(record, final_window=final_window)
        if row is not None:
            run_rows.append(row)
    for record in records:
        issues += record.issues
    aggregate, agg_issues = aggregate_runs(run_rows, ddof=ddof)
    return Results(records, run_rows, aggregate, issues + agg_issues)


def write_outputs(results: Results, output_dir: Path, ddof: int = 1, latex: bool = False, plots: bool = True
                  ) -> list[Path]:
    """runs.csv, summary.csv, summary.md, issues.txt, [table_success.tex, table_metrics.tex], plots/*.png."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [write_csv(results.run_rows, output_dir / "runs.csv", RUN_COLUMNS),
               write_csv(results.aggregate, output_dir / "summary.csv", aggregate_columns())]
    (output_dir / "summary.md").write_text(markdown_table(results.aggregate, ddof=ddof))
    written.append(output_dir / "summary.md")
    (output_dir / "issues.txt").write_text("".join(f"{issue}\n" for issue in results.issues))
    written.append(output_dir / "issues.txt")
    if latex:
        (output_dir / "table_success.tex").write_text(latex_success_table(results.aggregate, ddof=ddof))
        (output_dir / "table_metrics.tex").write_text(latex_metrics_table(results.aggregate, ddof=ddof))
        written += [output_dir / "table_success.tex", output_dir / "table_metrics.tex"]
    if plots:
        written += plot_training_curves(results.records, output_dir / "plots")
    return written


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs_dir", type=Path, action="append", default=[],
                        help="folder of run directories (repeatable); e.g. runs/craft_experiments/table1")
    parser.add_argument("--wandb_project", default=None, help="also read the runs of this wandb project (online)")
    parser.add_argument("--wandb_entity", default=None)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--generate_latex_table", action="store_true", help="also write booktabs LaTeX tables")
    parser.add_argument("--ddof", type=int, default=1, help="std degrees of freedom (1: sample std over seeds)")
    parser.add_argument("--final_window", type=int, default=1,
                        help="'final' values are the mean of this many last logged values")
    parser.add_argument("--include_incomplete", action="store_true",
                        help="keep runs whose training did not reach max_steps (reported as warnings)")
    parser.add_argument("--no_plots", action="store_true")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any problem was found")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if not args.runs_dir and not args.wandb_project:
        print("error: give --runs_dir and/or --wandb_project", file=sys.stderr)
        return 2
    try:
        results = collect(args.runs_dir, args.wandb_project, args.wandb_entity, ddof=args.ddof,
                          final_window=args.final_window, include_incomplete=args.include_incomplete)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = write_outputs(results, args.output_dir, ddof=args.ddof, latex=args.generate_latex_table,
                            plots=not args.no_plots)
    print(markdown_table(results.aggregate, ddof=args.ddof))
    for issue in results.issues:
        print(f"PROBLEM {issue}", file=sys.stderr)
    used = len(results.run_rows)
    print(f"{used} run(s) used, {len(results.records) - used} left out, {len(results.issues)} problem(s); wrote "
          f"{len(written)} file(s) to {args.output_dir}")
    if not results.run_rows:
        print("error: no usable run found", file=sys.stderr)
        return 1
    return 1 if args.strict and results.issues else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing
    from prismatic.cli_errors import cli_entry  # one-line errors, exit 2 (`--debug True`: traceback)

    sys.exit(cli_entry("log_parser")(main)())
