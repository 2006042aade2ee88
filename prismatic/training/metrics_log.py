"""Training metrics to wandb (upstream keys) and, with the same numbers, to `{run_dir}/metrics.jsonl`."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from prismatic.cli_errors import UserError, disk_full_error
from prismatic.training.method_label import method_label

METRICS_FILE = "metrics.jsonl"
WANDB_LOGIN_FIX = ("run `wandb login` (or set WANDB_API_KEY), or log offline with --wandb_mode offline / WANDB_MODE="
                   "offline and upload later with `wandb sync`")


def _jsonable(value):
    value = float(value) if not isinstance(value, (bool, int, str)) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it readable ("nan", "inf")
    return value


class MetricsLogger:
    """Rank-0 logger; on other ranks every call is a no-op. `wandb_mode` is online | offline | disabled."""

    def __init__(self, run_dir: Path, run_id: str, config: dict, *, enabled: bool, wandb_mode: str,
                 wandb_project: str, wandb_entity: str | None, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self._wandb_run = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:  # records past the start step belong to a run that is being replaced
            truncate_after(self.path, resume_step)
        if wandb_mode != "disabled":
            import wandb

            labels = wandb_labels(config)
            labels["config"]["train_run_id"] = run_id
            try:
                self._wandb_run = wandb.init(project=wandb_project, entity=wandb_entity, name=run_id,
                                             id=_wandb_id(run_id), config={**config, **labels["config"]},
                                             dir=str(run_dir), mode=wandb_mode, resume="allow", group=labels["group"],
                                             tags=labels["tags"], job_type=labels["job_type"])
            except wandb.errors.UsageError as exc:  # online without a login: one line with the fix
                raise UserError(f"wandb {wandb_mode} mode: {exc}", WANDB_LOGIN_FIX) from None

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:  # a full disk is one clear line naming the file, not a traceback
            converted = disk_full_error(exc, self.path)
            if converted is not exc:
                raise converted from exc
            raise
        if self._wandb_run is not None:
            self._wandb_run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def wandb_labels(config: dict) -> dict:
    """The labels the tables group by, for wandb: group `<experiment>/<preset>/<suite>/<shots>/<method>` (experiment =
    the run root's folder name, e.g. table1; shots `all` or `<k>shot`; method = the tables' label, so ablation
    variants and shot counts are groups of their own), tags, job type, and the same labels as config entries
    (`experiment`, `preset`, `suite`, `shots`, `method`, `seed`, `train_run_id`) for the dashboard and the parser."""
    root = config.get("run_root_dir")
    experiment = Path(str(root)).name if root else "runs"
    dataset = str(config.get("dataset_name", ""))
    suite = dataset[: -len("_no_noops")] if dataset.endswith("_no_noops") else dataset
    method = method_label(config)
    preset = str(config.get("model_preset", "real"))
    k = config.get("num_demos_per_task")
    shots = f"{k}shot" if k else "all"
    tags = [experiment, suite, method, f"preset-{preset}", f"seed-{config.get('seed')}", f"shots-{shots}"]
    return {"group": f"{experiment}/{preset}/{suite}/{shots}/{method}", "tags": tags, "job_type": "train",
            "config": {"experiment": experiment, "preset": preset, "suite": suite, "shots": shots, "method": method,
                       "seed": config.get("seed"), "train_run_id": config.get("run_id")}}


def _wandb_id(run_id: str) -> str:
    # wandb ids may not contain '/', and long ids are rejected; keep it stable so a resumed run continues its curve
    import hashlib

    return hashlib.sha1(run_id.encode()).hexdigest()[:16]


def read_metrics(path: Path, warn: bool = True) -> list[dict]:
    """All records of a metrics.jsonl file (empty list if it does not exist).

    A line that is not a JSON object (a torn last line after a crash or a full disk) is skipped and reported on
    stderr; the good lines are kept.
    """
    return read_metrics_checked(path, warn=warn)[0]


def read_metrics_checked(path: Path, warn: bool = True) -> tuple[list[dict], list[int]]:
    """(records, 1-based numbers of the unreadable lines)."""
    path = Path(path)
    if not path.is_file():
        return [], []
    records, bad = [], []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "step" in record:
                records.append(record)
            else:
                bad.append(number)
    if bad and warn:
        print(f"warning: {path}: skipped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}; a torn "
              "write after a crash or a full disk); kept the other records", file=sys.stderr)
    return records, bad


def truncate_after(path: Path, step: int) -> None:
    """Drop records with step > `step` (left by a run that went past the checkpoint being resumed) and any torn
    line, so the resumed run appends to a clean file."""
    records, bad = read_metrics_checked(path)
    kept = [r for r in records if r["step"] <= step]
    if len(kept) == len(records) and not bad:
        return
    tmp = Path(f"{path}.tmp")
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
