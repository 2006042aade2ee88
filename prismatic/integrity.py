"""sha256 of checkpoint files, recorded in the COMPLETE marker and verified by every reader.

A checkpoint's `COMPLETE` marker (json) holds `{"sha256": {relative path: hex digest}}` of every file in the folder
(written by `prismatic.training.checkpointing`). Resume, merge_lora and `load_policy` (evaluation, predict_action)
call `verify_checkpoint` first, so flipped bytes are an error instead of silently loaded weights. Kept free of torch
and of the training package so the model loaders can use it.

What counts as a checkpoint without checksums (docs/EXPERIMENTS_AND_TRAINING.md, "Checkpoint integrity"):
- no `COMPLETE` file at all: an upstream policy folder, a Prismatic VLM, an HF folder, a bare `save_pretrained`
  output. Nothing is recorded, nothing is verified (resume and merge refuse such a folder for other reasons);
- a `COMPLETE` that is a json object with only the keys written before checksums existed (`step`, `run_id`,
  `lora`, `merged`, `time`; `step` and `time` present, `step` that of the folder name when it has one) in a folder
  without `run_config.json` (written since the same change that added checksums): a legacy checkpoint, read as it
  is. Markers written now also carry `"format": 2`, which no legacy marker has.
Anything else is corrupt, never "legacy": an empty, torn or non-json marker, a marker without `sha256` that is not
the legacy shape, a `sha256` entry that is not a {file: hex digest} table, a file of the folder with no recorded
sha256. Damage can therefore not switch verification off. Whatever a reader cannot deserialise (a torch or
safetensors file of a legacy checkpoint, a cache shard) is reported by `unreadable_file` as one line naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
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
    return {name: file_sha256(Path(folder) / name) for name in folder_sha256_names(folder)}


LEGACY_MARKER_KEYS = frozenset({"step", "run_id", "lora", "merged", "time"})  # COMPLETE before checksums
MARKER_FORMAT = 2  # recorded in every COMPLETE written now (with the sha256 table)
CHECKSUM_ERA_FILES = ("run_config.json",)  # written only by the checkpoint writer that also records checksums
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHKPT_STEP = re.compile(r"^.+--(?P<step>\d+)_chkpt$")
_FIX = "use an earlier checkpoint of the run (or restore this one from a backup)"


def read_complete_marker(folder: Path) -> dict:
    """The COMPLETE marker of `folder` as a dict ({} when there is none); CorruptCheckpointError when it is
    unreadable, empty, not a json object or neither checksummed nor of the legacy shape (module docstring)."""
    folder = Path(folder)
    path = folder / COMPLETE_MARKER
    if not path.exists():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"checkpoint '{folder}' is corrupt: its {COMPLETE_MARKER} marker cannot be "
                                     f"read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                                     _FIX) from None
    if not isinstance(record, dict):
        raise CorruptCheckpointError(f"checkpoint '{folder}' is corrupt: its {COMPLETE_MARKER} marker is a json "
                                     f"{type(record).__name__}, not an object", _FIX)
    if "sha256" in record:
        table = record["sha256"]
        if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) and _HEX64.match(v)
                                                  for k, v in table.items()):
            raise CorruptCheckpointError(f"checkpoint '{folder}' is corrupt: the sha256 table of its "
                                         f"{COMPLETE_MARKER} marker is damaged", _FIX)
    elif not is_legacy_marker(folder, record):
        raise CorruptCheckpointError(f"checkpoint '{folder}' is corrupt: its {COMPLETE_MARKER} marker records no "
                                     f"checksums and is not a pre-checksum marker (keys {sorted(record)})", _FIX)
    return record


def is_legacy_marker(folder: Path, record: dict) -> bool:
    """True for the COMPLETE written before checksums existed: only its keys, with `step` (the folder's) and `time`,
    in a folder holding none of the files only the checksum-era writer writes."""
    if any((Path(folder) / name).exists() for name in CHECKSUM_ERA_FILES):
        return False
    if not record or not set(record) <= LEGACY_MARKER_KEYS or not {"step", "time"} <= set(record):
        return False
    if not isinstance(record["step"], int) or not isinstance(record["time"], str):
        return False
    match = _CHKPT_STEP.match(Path(folder).name)
    return match is None or int(match.group("step")) == record["step"]


def verify_checkpoint(folder: Path, files: list[str] | None = None, skip: tuple[str, ...] = ()) -> None:
    """Compare the files of a checkpoint with the sha256 in its COMPLETE marker (all, or only `files`).

    Raises CorruptCheckpointError naming the files that changed, are missing or have no recorded sha256, or when
    the marker itself is damaged. Folders without a marker and legacy markers (module docstring) pass.
    """
    folder = Path(folder)
    record = read_complete_marker(folder)
    if "sha256" not in record:
        return  # no marker (upstream / foreign format) or a legacy one: nothing recorded
    recorded = record["sha256"]
    present = set(folder_sha256_names(folder))
    names = sorted(set(recorded) | present) if files is None else list(files)
    names = [n for n in names if not n.startswith(skip)] if skip else names
    bad = []
    for name in names:
        path = folder / name
        if name not in recorded:
            if path.is_file():
                bad.append(f"{name} (no sha256 recorded)")
        elif not path.is_file():
            bad.append(f"{name} (missing)")
        elif file_sha256(path) != recorded[name]:
            bad.append(f"{name} (sha256 differs)")
    if bad:
        raise CorruptCheckpointError(f"checkpoint '{folder}' is corrupt: {', '.join(bad[:5])}"
                                     f"{' ...' if len(bad) > 5 else ''}", _FIX)


def folder_sha256_names(folder: Path) -> list[str]:
    """The files `folder_sha256` records (relative posix paths), without hashing them."""
    folder = Path(folder)
    return [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != COMPLETE_MARKER and not p.name.startswith(f".{COMPLETE_MARKER}")]


@contextlib.contextmanager
def unreadable_file(path: Path | str, fix: str = _FIX) -> Iterator[None]:
    """Wrap the one call that deserialises `path` (torch.load, safetensors): whatever it raises (torch's
    UnpicklingError, a zip or header error, EOF) becomes one CorruptCheckpointError naming the file."""
    try:
        yield
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to deserialise one named file means the file is damaged
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CorruptCheckpointError(f"'{path}' cannot be read, it is damaged or not what its name says "
                                     f"({type(exc).__name__}{': ' + detail if detail else ''})", fix) from exc
