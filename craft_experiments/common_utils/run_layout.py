"""Where a grid run's files live and whether its evaluation / drift measure belong to its final checkpoint.

Shared by the grid runner (`grid.py`: skip or redo) and the log parser (`run_reading.py`: use or ignore), so both
apply the same rule:

    {run_root}/{run_id}/                      config.yaml, metrics.jsonl (finetune.py), wandb/ (offline runs)
    {run_root}/{run_id}/eval/summary.json     LIBERO evaluation of the final checkpoint (run_libero_eval.py)
    {run_root}/{run_id}/drift/drift.json      measure_drift.py on the final checkpoint
    {run_root}/{run_id}--{max_steps}_chkpt/   the final checkpoint (COMPLETE marker)

An evaluation counts only if its summary names the run's final checkpoint: `checkpoint.path` (and `checkpoint.step`
when present) written by run_libero_eval.py, or its older `pretrained_checkpoint` field. A summary of an earlier
checkpoint (e.g. MAX_STEPS was raised and the run resumed) is stale: the runner re-runs it, the parser ignores it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVAL_SUMMARY = Path("eval") / "summary.json"
DRIFT_REPORT = Path("drift") / "drift.json"
COMPLETE_MARKER = "COMPLETE"


def final_checkpoint(run_root: Path, run_id: str, max_steps: int) -> Path:
    return Path(run_root) / f"{run_id}--{int(max_steps)}_chkpt"


def _same_path(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def summary_checkpoint(summary: dict[str, Any]) -> tuple[str | None, int | None]:
    """(path, step) of the checkpoint an eval summary says it evaluated (None when it does not say)."""
    ckpt = summary.get("checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("path"):
        step = ckpt.get("step")
        return str(ckpt["path"]), int(step) if isinstance(step, int) else None
    path = summary.get("pretrained_checkpoint")
    return (str(path), None) if path else (None, None)


def stale_reason(summary: dict[str, Any], final: Path, max_steps: int) -> str | None:
    """Why an evaluation summary does not belong to the final checkpoint `final` (None: it does)."""
    path, step = summary_checkpoint(summary)
    if path is None:
        return "its summary does not say which checkpoint it evaluated"
    if not _same_path(path, final):
        return f"it evaluated {Path(path).name}, not the final checkpoint {final.name}"
    if step is not None and step != int(max_steps):
        return f"it evaluated step {step}, not the final step {max_steps}"
    return None


def drift_stale_reason(report: dict[str, Any], final: Path) -> str | None:
    """Why a drift.json was not measured on `final` (None: it was)."""
    finetuned = (report.get("config") or {}).get("finetuned_path")
    if not finetuned:
        return "the drift report does not name its fine-tuned checkpoint"
    if not _same_path(finetuned, final):
        return f"it measured {Path(finetuned).name}, not the final checkpoint {final.name}"
    return None


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None if the file is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
