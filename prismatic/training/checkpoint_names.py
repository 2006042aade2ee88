"""Names inside a run root: the checkpoint folder `<run id>--<step>_chkpt`, its COMPLETE marker, its training state.

Torch-free and importing nothing of the training package, so `finetune_config`, `run_folder` and `checkpointing` all
read the names from here without importing one another.
"""

from __future__ import annotations

import re
from pathlib import Path

from prismatic.integrity import COMPLETE_MARKER

CHECKPOINT_DIR_PATTERN = re.compile(r"^(?P<run_id>.+)--(?P<step>\d+)_chkpt$")
TRAINING_STATE_FILE = "training_state.pt"

__all__ = ["CHECKPOINT_DIR_PATTERN", "COMPLETE_MARKER", "TRAINING_STATE_FILE", "parse_checkpoint_dir"]


def parse_checkpoint_dir(path: Path) -> tuple[str, int]:
    """(run_id, step) from a `{run_id}--{step}_chkpt` folder name; ValueError if the name does not match."""
    match = CHECKPOINT_DIR_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"'{path}' is not a checkpoint folder: expected a name like '<run id>--<step>_chkpt'")
    return match.group("run_id"), int(match.group("step"))
