"""sha256 of checkpoint files, recorded in the COMPLETE marker and verified by every reader.

A checkpoint's `COMPLETE` marker (json) holds `{"sha256": {relative path: hex digest}}` of every file in the folder
(written by `prismatic.training.checkpointing`). Resume, merge_lora and `load_policy` (evaluation, predict_action)
call `verify_checkpoint` first, so flipped bytes are an error instead of silently loaded weights. Kept free of torch
and of the training package so the model loaders can use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from prismatic.cli_errors import UserError

COMPLETE_MARKER = "COMPLETE"


class CorruptCheckpointError(UserError):
    """A checkpoint whose files do not match the sha256 recorded in its COMPLETE marker."""


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(folder: Path) -> dict[str, str]:
    """{relative posix path: sha256} of every file under `folder` except the COMPLETE marker and hidden temp files."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(f".{COMPLETE_MARKER}")}


def read_complete_marker(folder: Path) -> dict:
    try:
        record = json.loads((Path(folder) / COMPLETE_MARKER).read_text() or "{}")
    except (OSError, ValueError):
        return {}  # no marker, or an older plain-text one
    return record if isinstance(record, dict) else {}


def verify_checkpoint(folder: Path, files: list[str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Compare the files of a checkpoint with the sha256 in its COMPLETE marker (all, or only `files`).

    Raises CorruptCheckpointError naming the files that changed or are missing. A folder without a marker or
    checksums (upstream policy folders, checkpoints written before checksums were recorded) passes.
    """
    folder = Path(folder)
    recorded = read_complete_marker(folder).get("sha256")
    if not recorded:
        return
    names = sorted(recorded) if files is None else [f for f in files if f in recorded]
    names = [n for n in names if not n.startswith(skip)] if skip else names
    bad = []
    for name in names:
        path = folder / name
        if not path.is_file():
            bad.append(f"{name} (missing)")
        elif file_sha256(path) != recorded[name]:
            bad.append(f"{name} (sha256 differs)")
    if bad:
        raise CorruptCheckpointError(f"checkpoint '{folder}' is corrupt: {', '.join(bad[:5])}"
                                     f"{' ...' if len(bad) > 5 else ''}",
                                     "use an earlier checkpoint of the run (or restore this one from a backup)")
