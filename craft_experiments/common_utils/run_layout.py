"""Where a grid run's files live and whether its evaluation / drift measure belong to its final checkpoint.

Shared by the grid runner (`grid.py`: skip or redo) and the log parser (`run_reading.py`: use or ignore), so both
apply the same rule:

    {run_root}/{run_id}/                      config.yaml, metrics.jsonl (finetune.py), wandb/ (offline runs)
    {run_root}/{run_id}/eval/summary.json     LIBERO evaluation of the final checkpoint (run_libero_eval.py)
    {run_root}/{run_id}/eval_steps/<step>/summary.json   evaluations of earlier checkpoints (EVAL_EVERY_KTH_CHECKPOINT)
    {run_root}/{run_id}/drift/drift.json      measure_drift.py on the final checkpoint
    {run_root}/{run_id}--{max_steps}_chkpt/   the final checkpoint (COMPLETE marker)

Results belong to weights, not to paths: an evaluation (drift report) counts for a checkpoint when the
`weights_sha256` it recorded (prismatic/training/checkpoint_identity.py) equals the checkpoint folder's current one
and its step is the checkpoint's. A root moved, copied or rsynced elsewhere therefore keeps every result, and a
checkpoint retrained at the same path invalidates the old ones. Without the checkpoint at hand (a copy without
weights) or for a report that recorded no hash (older tools), the checkpoint's folder name and step decide, never
the absolute path.
"""

from __future__ import annotations

import json
import re
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:  # run as a script from a checkout: the repository's own prismatic package
    sys.path.insert(0, _REPO)

from prismatic.training.checkpoint_identity import weights_sha256  # noqa: E402

EVAL_SUMMARY = Path("eval") / "summary.json"
EVAL_STEPS = "eval_steps"  # <run>/eval_steps/<step>/summary.json: an earlier checkpoint's evaluation
DRIFT_REPORT = Path("drift") / "drift.json"
COMPLETE_MARKER = "COMPLETE"
_CHKPT_NAME = re.compile(r"^.+--(\d+)_chkpt$")


def final_checkpoint(run_root: Path, run_id: str, max_steps: int) -> Path:
    return Path(run_root) / f"{run_id}--{int(max_steps)}_chkpt"


def step_eval_summary(run_root: Path, run_id: str, step: int) -> Path:
    return Path(run_root) / run_id / EVAL_STEPS / str(int(step)) / "summary.json"


@lru_cache(maxsize=256)
def _cached_hash(folder: str, stamp: tuple) -> str | None:
    try:
        return weights_sha256(folder)
    except (OSError, ValueError):
        return None


def current_weights_sha256(folder: Path) -> str | None:
    """The checkpoint folder's weights hash now (None: no complete checkpoint with weights there); hashed once per
    process and file state."""
    folder = Path(folder)
    if not (folder / COMPLETE_MARKER).is_file():
        return None
    try:
        stamp = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                             if p.is_file()))
    except OSError:
        return None
    return _cached_hash(str(folder.resolve()), stamp)


def summary_checkpoint(summary: dict[str, Any]) -> tuple[str | None, int | None, str | None]:
    """(path, step, weights_sha256) of the checkpoint an eval summary says it evaluated (None where it does not say)."""
    ckpt = summary.get("checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("path"):
        step = ckpt.get("step")
        digest = ckpt.get("weights_sha256")
        return str(ckpt["path"]), int(step) if isinstance(step, int) else None, digest or None
    path = summary.get("pretrained_checkpoint")
    return (str(path), None, None) if path else (None, None, None)


def _name_step(name: str) -> int | None:
    match = _CHKPT_NAME.match(name)
    return int(match.group(1)) if match else None


def _mismatch(path: str, step: int | None, digest: str | None, checkpoint: Path, what: str) -> str | None:
    """Why (path, step, digest) is not `checkpoint` (None: it is); see the module docstring for the rule."""
    want_step = _name_step(checkpoint.name)
    if step is None:
        step = _name_step(Path(path).name)
    if step is not None and want_step is not None and step != want_step:
        return f"it {what} step {step}, not step {want_step} ({checkpoint.name})"
    current = current_weights_sha256(checkpoint)
    if digest and current:
        if digest != current:
            return (f"it {what} weights {digest[:12]}, but {checkpoint.name} now holds weights {current[:12]} "
                    "(retrained at the same path?)")
        return None
    if Path(path).name != checkpoint.name:
        return f"it {what} {Path(path).name}, not {checkpoint.name}"
    return None


def stale_reason(summary: dict[str, Any], checkpoint: Path) -> str | None:
    """Why an evaluation summary does not belong to `checkpoint` (None: it does)."""
    path, step, digest = summary_checkpoint(summary)
    if path is None:
        return "its summary does not say which checkpoint it evaluated"
    return _mismatch(path, step, digest, Path(checkpoint), "evaluated")


def drift_stale_reason(report: dict[str, Any], checkpoint: Path) -> str | None:
    """Why a drift.json was not measured on `checkpoint` (None: it was)."""
    identity = report.get("finetuned_checkpoint") or {}
    finetuned = identity.get("path") or (report.get("config") or {}).get("finetuned_path")
    if not finetuned:
        return "the drift report does not name its fine-tuned checkpoint"
    step = identity.get("step") if isinstance(identity.get("step"), int) else None
    return _mismatch(str(finetuned), step, identity.get("weights_sha256"), Path(checkpoint), "measured")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None if the file is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None
