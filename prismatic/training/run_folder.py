"""The run folder of `finetune.py`: never reuse a finished run by accident, recover from a kill, inherit on resume.

- `claim_run_folder`: a fresh run refuses a run id whose folder holds metrics or whose checkpoints exist (naming
  `--resume True` and `--overwrite True`); `--overwrite True` moves the old run aside and deletes it.
- `recover_interrupted_saves`: start-up removes this run's `.…tmp-<pid>` folders whose process is gone and puts back
  a checkpoint left as `.…old-<pid>` by a kill between the two renames of an atomic save.
- `resolve_resume_config`: on `--resume True` the run-defining flags come from the checkpoint; a different value given
  explicitly is refused with the list of differences, flags not given take the run's values.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

from prismatic.cli_errors import UserError
from prismatic.run_lock import pid_alive
from prismatic.training.metrics_log import METRICS_FILE

CONFIG_FILE = "config.yaml"
RUN_CONFIG_KEY = "run_config"  # training_state.pt entry holding the run's resolved flags (strings for paths)

# Flags that define the model or the data of a run: a resumed run must keep them.
RUN_DEFINING_FLAGS = (
    "model_preset", "use_pro_version", "use_proprio", "num_images_in_input", "use_l1_regression",
    "use_lora", "lora_rank", "lora_dropout", "freeze_vision_backbone",
    "dataset_name", "num_demos_per_task", "allow_fewer_demos", "seed", "image_aug", "use_val_set",
    "use_craft", "retention_method", "craft_retention_budget", "craft_raw_layer", "craft_aq_layer",
    "craft_anchor_type", "craft_anchor_source", "craft_enable_projection", "craft_enable_dual",
    "craft_fixed_lambda", "craft_init_lambda", "craft_dual_lr", "craft_delta",
    "craft_dual_mode", "craft_dual_kp", "craft_dual_kd", "craft_dual_normalize", "craft_max_lambda",
    "craft_dual_nu", "craft_dual_log_error", "craft_dual_setpoint", "craft_adam_second_moment",
    "craft_retention_every", "craft_reuse",
    "align_weight", "align_layer", "align_teacher", "consft_tau", "consft_clip", "ki_action_loss_weight",
    "distributed_strategy",  # the optimizer state's format (index- or name-keyed) follows it
)
# Flags a resume takes from this invocation only (never inherited from the run).
NOT_INHERITED = ("config_file_path", "resume", "resume_step", "overwrite", "run_id", "run_id_note")
_TMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


# ---- fresh runs -------------------------------------------------------------------------------------------------
def run_artefacts(run_root_dir: Path, run_id: str) -> list[Path]:
    """What a previous run of `run_id` left: its metrics file and its checkpoint folders (complete or not)."""
    run_dir = Path(run_root_dir) / run_id
    found = [run_dir / METRICS_FILE] if (run_dir / METRICS_FILE).is_file() else []
    pattern = re.compile(rf"^{re.escape(run_id)}--\d+_chkpt$")
    if Path(run_root_dir).is_dir():
        found += sorted(p for p in Path(run_root_dir).iterdir() if pattern.match(p.name))
    return found


def claim_run_folder(run_root_dir: Path, run_id: str, overwrite: bool, delete: bool = True) -> None:
    """Refuse (or, with --overwrite True, clear) a run id that already holds a run. `delete` False: only check
    (the non-main ranks of a DDP run; rank 0 deletes)."""
    existing = run_artefacts(run_root_dir, run_id)
    if not existing or (overwrite and not delete):
        return
    if not overwrite:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise UserError(f"run '{run_id}' already exists under '{run_root_dir}' ({shown})",
                        "continue it with --resume True --config_file_path <its checkpoint> --resume_step <step>, "
                        "start it again with --overwrite True (deletes it), or pick another --run_id / --seed")
    from prismatic.training.checkpointing import remove_tree  # torch: only when something is deleted

    for path in [Path(run_root_dir) / run_id] + [p for p in existing if p.name != METRICS_FILE]:
        remove_tree(path)


# ---- crash recovery ---------------------------------------------------------------------------------------------
def recover_interrupted_saves(run_root_dir: Path, run_id: str) -> list[str]:
    """Clean what a killed save of this run left; returns a note per action (printed by the caller)."""
    root = Path(run_root_dir)
    if not root.is_dir():
        return []
    notes = []
    own = re.compile(rf"^{re.escape(run_id)}--\d+_chkpt$")
    for path in sorted(root.iterdir()):
        match = _TMP.match(path.name)
        if match is None or not own.match(match.group("name")) or pid_alive(int(match.group("pid"))):
            continue
        final = root / match.group("name")
        if match.group("kind") == "old" and not final.exists():
            os.rename(path, final)  # killed between "final -> old" and "tmp -> final": the old one is the checkpoint
            notes.append(f"restored checkpoint {final} (left as {path.name} by an interrupted save)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {path.name} (left by an interrupted save of process {match.group('pid')})")
    for path in sorted(root.glob(f".{run_id}--*_chkpt.trash-*")):
        shutil.rmtree(path, ignore_errors=True)  # an interrupted prune / overwrite
        notes.append(f"removed {path.name} (an interrupted deletion)")
    return notes


# ---- resume -----------------------------------------------------------------------------------------------------
def config_record(cfg) -> dict:
    """The flags of `cfg` as plain values (paths as strings) for training_state.pt."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def given_flags_from_defaults(cfg) -> set[str]:
    """For in-process callers of train(cfg): a flag counts as given when it differs from its default."""
    defaults = type(cfg)()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(defaults, f.name)}


def resolve_resume_config(cfg, recorded: dict | None, given: set[str]):
    """`cfg` with the run's values for every flag not given now; UserError listing run-defining differences."""
    if recorded is None:
        return cfg  # a checkpoint written before the flags were recorded: nothing to compare with
    names = {f.name: f for f in dataclasses.fields(cfg)}
    diffs = []
    for name in RUN_DEFINING_FLAGS:
        if name in given and name in recorded and _norm(getattr(cfg, name)) != _norm(recorded[name]):
            diffs.append(f"--{name} {getattr(cfg, name)!r} (run: {recorded[name]!r})")
    if diffs:
        raise UserError(f"--resume True with flags that differ from the run being resumed: {', '.join(diffs)}",
                        "drop these flags (a resumed run keeps its model and data), or start a new run without "
                        "--resume")
    updates = {}
    for name, value in recorded.items():
        if name not in names or name in NOT_INHERITED or name in given:
            continue
        current = getattr(cfg, name)
        if isinstance(current, Path) or (value is not None and names[name].type in ("Path", "Path | None")):
            value = Path(value) if value is not None else None
        updates[name] = value
    if "run_root_dir" not in given and cfg.config_file_path is not None:
        updates["run_root_dir"] = Path(cfg.config_file_path).parent  # checkpoints are siblings of the run folder
    return dataclasses.replace(cfg, **updates)


def _norm(value):
    return str(value) if isinstance(value, Path) else value
