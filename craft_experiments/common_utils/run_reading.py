"""Reading CRaFT experiment runs: local run directories (finetune.py's config.yaml / metrics.jsonl, the grid's
eval/summary.json and drift/drift.json), the local runs of a wandb project (offline, no network) and, on request,
the wandb API.

Every problem is recorded on the run (`RunRecord.issues`), never silently averaged: a run without config, an empty or
unreadable metrics file, a missing / inconsistent / stale summary.json (an evaluation of another checkpoint than the
run's final one is ignored), an unfinished training.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from run_layout import (
    DRIFT_REPORT,
    EVAL_STEPS,
    EVAL_SUMMARY,
    drift_stale_reason,
    final_checkpoint,
    read_json,
    stale_reason,
)

from LIBERO.results import success_rate_key  # noqa: E402  (light; run_layout put the repository on sys.path)

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_SUFFIX = "_chkpt"
COMPLETE_MARKER = "COMPLETE"

KEY_ACTION_LOSS = "VLA Train/Loss"
KEY_RETENTION_LOSS = "CRaFT/Retention Loss"
KEY_RETENTION_MONITOR = "CRaFT/Retention Loss (monitor)"  # the monitor's key inside a CRaFT run
KEY_LAMBDA = "CRaFT/Lambda"
KEY_CONFLICT_RATIO = "CRaFT/Conflict Ratio"
KEY_CONFLICT_NULL = "CRaFT/Conflict Ratio Null"  # the same share between unrelated gradients (docs/CRAFT.md)
KEY_COSINE = "CRaFT/Grad Cosine"
CURVE_KEYS = (KEY_ACTION_LOSS, KEY_RETENTION_LOSS, KEY_RETENTION_MONITOR, KEY_LAMBDA, KEY_CONFLICT_RATIO,
              KEY_CONFLICT_NULL, KEY_COSINE)


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
    drift: dict | None = None  # measure_drift.py's report on the final checkpoint
    step_evals: dict[int, dict] = field(default_factory=dict)  # step -> evaluation of that earlier checkpoint
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
    """Records of a metrics.jsonl file. A torn LAST line (the run was cut while writing: crash, full disk) is skipped
    with a warning and the good lines are kept, as training's own reader does. Raises RunDataError on an empty file,
    an unreadable line before the last one, a record without an integer `step`, or steps that go backwards."""
    path = Path(path)
    records: list[dict] = []
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), start=1)
             if line.strip()]
    for index, (lineno, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if index == len(lines) - 1:
                print(f"warning: {path}: skipped the torn last line {lineno} ({exc.msg}); kept {len(records)} "
                      "record(s)", file=sys.stderr)
                break
            raise RunDataError(f"{path} line {lineno} is not valid JSON ({exc.msg}): {line.strip()[:120]!r}") from exc
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
    final = None
    if record.config is not None and isinstance(record.config.get("max_steps"), int):
        final = final_checkpoint(run_dir.parent, run_dir.name, record.config["max_steps"])
    if not summary_path.is_file():
        record.report("warning", f"no {EVAL_SUMMARY} (not evaluated yet?): success rate left out")
    else:
        try:
            record.eval_summary = read_eval_summary(summary_path)
        except RunDataError as exc:
            record.report("warning", f"success rate left out: {exc}")
        if record.eval_summary is not None and final is not None:
            why = stale_reason(record.eval_summary, final)
            if why is not None:
                record.eval_summary = None
                record.report("warning", f"stale evaluation ignored: {why} (rerun the grid script to redo it)")
    _read_step_evals(record, run_dir)
    drift = read_json(run_dir / DRIFT_REPORT)
    if drift is not None and final is not None:
        why = drift_stale_reason(drift, final)
        if why is None:
            record.drift = drift
        else:
            record.report("warning", f"stale drift report ignored: {why}")
    if record.config is not None and record.metrics is not None:
        max_steps = record.config.get("max_steps")
        chkpt = run_dir.parent / f"{run_dir.name}--{max_steps}{CHECKPOINT_SUFFIX}" if max_steps is not None else None
        complete, why = _training_complete(record.config, record.metrics, chkpt)
        record.training_complete = complete
        if not complete:
            record.report("error", why)
    return record


def _read_step_evals(record: RunRecord, run_dir: Path) -> None:
    """Evaluations of earlier checkpoints (grid option EVAL_EVERY_KTH_CHECKPOINT), each checked against its own
    checkpoint like the final one; a stale or unreadable one is left out with a warning."""
    folder = run_dir / EVAL_STEPS
    if not folder.is_dir():
        return
    for step_dir in sorted(folder.iterdir(), key=lambda p: p.name):
        if not step_dir.name.isdigit() or not (step_dir / "summary.json").is_file():
            continue
        try:
            summary = read_eval_summary(step_dir / "summary.json")
        except RunDataError as exc:
            record.report("warning", f"checkpoint evaluation left out: {exc}")
            continue
        why = stale_reason(summary, final_checkpoint(run_dir.parent, run_dir.name, int(step_dir.name)))
        if why is not None:
            record.report("warning", f"stale evaluation of step {step_dir.name} ignored: {why}")
            continue
        record.step_evals[int(step_dir.name)] = summary


# Files finetune.py writes into a run directory; a folder holding any of them is a run (perhaps a broken one).
RUN_FILES = (CONFIG_FILE, METRICS_FILE, "dataset_statistics.json", "few_shot_episodes.json")
NOT_RUN_DIRS = ("logs", "wandb", "eval", EVAL_STEPS, "drift", "plots", "results", "craft_cache")


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
def load_local_project_runs(project: str, roots: list[Path]) -> tuple[list[RunRecord], list[Issue]]:
    """The runs of wandb project `project` found on disk, without network: every run directory below `roots` whose
    config.yaml says `wandb_project: <project>` (finetune.py writes it next to its offline wandb folder; runs logged
    with --wandb_mode disabled are found too). Sync them to the server with `wandb sync <run dir>/wandb/offline-run-*`.
    """
    records: list[RunRecord] = []
    issues: list[Issue] = []
    for root in roots:
        if not Path(root).is_dir():
            raise FileNotFoundError(f"no local run folder '{root}' to read project '{project}' from — run from the "
                                    "repository root (runs/ is finetune.py's default --run_root_dir) or pass "
                                    "--runs_dir <folder of runs>")
        found, found_issues = discover_runs(Path(root))
        mine = [r for r in found if r.config is not None and r.config.get("wandb_project") == project]
        names = {r.name for r in mine}
        records += mine
        issues += [i for i in found_issues if i.run in names]
    return records, issues


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
    evals = [run for run in runs if getattr(run, "job_type", None) == "eval"]
    for run in runs:
        if getattr(run, "job_type", None) == "eval":
            continue  # joined to its training run below
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
        records.append(record)
    _join_eval_runs(records, evals)
    for record in records:
        if record.eval_summary is None:
            record.report("warning", "no success rate in the wandb run summary nor in an evaluation run "
                          "(job_type eval) of this training run: success rate left out")
    return records


def _join_eval_runs(records: list[RunRecord], evals: list[Any]) -> None:
    """Success rates of the evaluation runs (run_libero_eval.py, job_type `eval`, config `train_run_id` and the
    evaluated `checkpoint`) onto their training runs: the evaluation of the run's final checkpoint, when the
    training run's own summary has none."""
    by_name = {r.name: r for r in records}
    for run in evals:
        config = _unwrap_wandb_config(dict(run.config))
        target = by_name.get(str(config.get("train_run_id")))
        if target is None or target.eval_summary is not None or target.config is None:
            continue
        checkpoint = config.get("checkpoint") or {}
        if isinstance(checkpoint, dict) and checkpoint.get("step") not in (None, target.config.get("max_steps")):
            continue  # an earlier checkpoint's evaluation
        summary = dict(getattr(run.summary, "_json_dict", None) or run.summary)
        suite = config.get("task_suite_name")
        rate = summary.get(success_rate_key(str(suite)), summary.get("success_rate/total"))
        if rate is None:
            continue
        target.eval_summary = {"task_suite_name": suite, "success_rate": float(rate)}
        if isinstance(summary.get("num_episodes"), int):
            target.eval_summary["num_episodes"] = summary["num_episodes"]


