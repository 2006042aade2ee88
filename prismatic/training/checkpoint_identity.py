"""Identity of a checkpoint folder: which weights an evaluation (or any derived artefact) was computed from.

`checkpoint_identity(folder)` returns `{"path", "step", "weights_sha256", "weight_files"}`:
- `step`: from the folder name `<run id>--<step>_chkpt`, else from the `action_head--<step>_checkpoint.pt` file
  name (upstream folders), else None;
- `weights_sha256`: sha256 over the weight files of the folder (top level, suffix .safetensors / .pt / .bin /
  .pth, sorted by name): for each file the line `<name> <sha256 of its bytes>\n`, and the hash of those lines.
  Tokenizer, statistics and json configs are not weights and do not enter it; training_state.pt (optimizer and
  RNG state) neither, so a checkpoint copied without it keeps its identity.

A stored identity is stale when the folder's current `weights_sha256` differs (`same_weights`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")
NOT_WEIGHTS = ("training_state.pt",)  # optimizer / RNG state: resuming needs it, the policy does not
_CHKPT_DIR = re.compile(r"^.+--(?P<step>\d+)_chkpt$")
_HEAD_FILE = re.compile(r"^action_head--(?P<step>\d+)_checkpoint\.pt$")
_CHUNK = 1 << 22


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files of a checkpoint folder, sorted by name."""
    folder = Path(folder)
    return sorted((p for p in folder.iterdir()
                   if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES) and p.name not in NOT_WEIGHTS),
                  key=lambda p: p.name)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: str | Path) -> str:
    """sha256 over `<name> <sha256>\\n` of every weight file (sorted names); ValueError if there is none."""
    files = weight_files(folder)
    if not files:
        raise ValueError(f"{folder} holds no weight files ({', '.join(WEIGHT_SUFFIXES)})")
    lines = "".join(f"{p.name} {file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def checkpoint_step(folder: str | Path) -> int | None:
    """Training step of a checkpoint folder (folder name, else the action head's file name), or None."""
    folder = Path(folder)
    match = _CHKPT_DIR.match(folder.name)
    if match:
        return int(match.group("step"))
    steps = {int(m.group("step")) for p in folder.iterdir() if (m := _HEAD_FILE.match(p.name))}
    return steps.pop() if len(steps) == 1 else None


def checkpoint_identity(folder: str | Path) -> dict:
    """{"path": absolute path, "step": int | None, "weights_sha256": hex, "weight_files": [names]}."""
    folder = Path(folder).resolve()
    return {"path": str(folder), "step": checkpoint_step(folder), "weights_sha256": weights_sha256(folder),
            "weight_files": [p.name for p in weight_files(folder)]}


def same_weights(identity: dict, folder: str | Path) -> bool:
    """True when `folder` still holds the weights `identity` (a stored checkpoint_identity) was computed from."""
    return identity.get("weights_sha256") == weights_sha256(folder)
