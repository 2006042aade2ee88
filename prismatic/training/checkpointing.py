"""Checkpoint folders written atomically, and the training state that makes resume exact.

A checkpoint is `{run_root_dir}/{run_id}--{step}_chkpt/`. It is assembled in a hidden temporary sibling, the
`COMPLETE` marker is written last, and only then is the folder renamed to its final name: a crash at any point
leaves either the previous state or a hidden `.…tmp-<pid>` folder that no loader treats as a checkpoint.

`training_state.pt` holds only tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)`
reads it: optimizer and scheduler state_dicts, the step, every rank's RNG states (python / numpy / torch / cuda,
as tensors), the data-stream position, the non-finite counters and a `craft` entry (None for plain training).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from prismatic.cli_errors import disk_full_error
from prismatic.integrity import (  # noqa: F401 - re-exported: the checkpoint API lives here
    MARKER_FORMAT,
    CorruptCheckpointError,
    file_sha256,
    folder_sha256,
    read_complete_marker,
    unreadable_file,
    verify_checkpoint,
)
from prismatic.training.checkpoint_names import COMPLETE_MARKER, TRAINING_STATE_FILE, parse_checkpoint_dir

TRAINING_STATE_VERSION = 1


def checkpoint_dir(run_root_dir: Path, run_id: str, step: int) -> Path:
    return Path(run_root_dir) / f"{run_id}--{step}_chkpt"


def is_complete_checkpoint(path: Path) -> bool:
    """A folder counts as a checkpoint only with its COMPLETE marker and a checkpoint name."""
    path = Path(path)
    try:
        parse_checkpoint_dir(path)
    except ValueError:
        return False
    return (path / COMPLETE_MARKER).is_file()


def list_checkpoints(run_root_dir: Path, run_id: str) -> list[tuple[int, Path]]:
    """Complete checkpoints of one run, sorted by step."""
    found = []
    for path in Path(run_root_dir).glob(f"{run_id}--*_chkpt"):
        try:
            rid, step = parse_checkpoint_dir(path)
        except ValueError:
            continue
        if rid == run_id and is_complete_checkpoint(path):
            found.append((step, path))
    return sorted(found)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint_atomically(final_dir: Path, write_contents: Callable[[Path], None], marker: dict) -> Path:
    """Build the folder with `write_contents(tmp_dir)`, write COMPLETE (json `marker`) last, rename into place.

    Any exception (or KeyboardInterrupt) removes the temporary folder and propagates; an existing folder with the
    same name is replaced only after the new one is complete.
    """
    final_dir = Path(final_dir)
    tmp_dir = final_dir.parent / f".{final_dir.name}.tmp-{os.getpid()}"
    old_dir = final_dir.parent / f".{final_dir.name}.old-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        try:
            write_contents(tmp_dir)
            write_complete_marker(tmp_dir, marker)
        except BaseException as exc:
            needed = _checkpoint_size_estimate(final_dir, tmp_dir)
            # judged before the partial folder is removed: removing it frees the space whose lack failed the write
            converted = disk_full_error(exc, final_dir, needed)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            if converted is not exc:
                raise converted from exc
            raise
        _fsync_dir(tmp_dir)
        if final_dir.exists():
            os.rename(final_dir, old_dir)
        os.rename(tmp_dir, final_dir)
        _fsync_dir(final_dir.parent)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if old_dir.exists() and not final_dir.exists():
            os.rename(old_dir, final_dir)  # put the previous complete checkpoint back
        raise
    shutil.rmtree(old_dir, ignore_errors=True)
    return final_dir


def prune_checkpoints(run_root_dir: Path, run_id: str, keep: Path) -> None:
    """Remove every complete checkpoint of `run_id` except `keep` (for --save_latest_checkpoint_only); each is
    renamed to a hidden trash name first, so an interruption never leaves a partial folder under a checkpoint name."""
    for _, path in list_checkpoints(run_root_dir, run_id):
        if path.resolve() != Path(keep).resolve():
            remove_tree(path)


def remove_tree(path: Path) -> None:
    """Rename `path` to `.<name>.trash-<pid>`, then delete it (start-up removes trash left by a kill)."""
    path = Path(path)
    if not path.exists():
        return
    trash = path.parent / f".{path.name}.trash-{os.getpid()}"
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    _fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


# ---- checksums in the COMPLETE marker (prismatic/integrity.py) ---------------------------------------------------
def write_complete_marker(folder: Path, marker: dict) -> None:
    """COMPLETE (json: `marker`, time, sha256 of every file), written atomically and fsynced."""
    record = {**marker, "format": MARKER_FORMAT, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "sha256": folder_sha256(folder)}
    tmp = Path(folder) / f".{COMPLETE_MARKER}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(folder) / COMPLETE_MARKER)


def reseal_checkpoint(folder: Path) -> None:
    """Record the current files' sha256 after a tool added or replaced files in a checkpoint (merge_lora)."""
    marker = {k: v for k, v in read_complete_marker(folder).items() if k not in ("sha256", "time", "format")}
    write_complete_marker(folder, marker)


def _checkpoint_size_estimate(final_dir: Path, tmp_dir: Path) -> int | None:
    """Bytes a checkpoint of this run takes: the newest sibling checkpoint's size, else what was written so far."""
    try:
        run_id, _ = parse_checkpoint_dir(final_dir)
        previous = list_checkpoints(final_dir.parent, run_id)
        folder = previous[-1][1] if previous else tmp_dir
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) or None
    except (OSError, ValueError):
        return None


# ---- RNG state as tensors ------------------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """This process's RNG states (python, numpy, torch, cuda) in a form `torch.load(weights_only=True)` accepts."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- training_state.pt ---------------------------------------------------------------------------------------
def save_training_state(path: Path, state: dict) -> None:
    torch.save({"version": TRAINING_STATE_VERSION, **state}, path)


def load_training_state(checkpoint: Path) -> dict:
    """Read `training_state.pt` of a complete checkpoint (weights_only=True); clear errors otherwise."""
    checkpoint = Path(checkpoint)
    if not is_complete_checkpoint(checkpoint):
        raise FileNotFoundError(f"'{checkpoint}' is not a complete checkpoint (no {COMPLETE_MARKER} marker or "
                                "not named '<run id>--<step>_chkpt')")
    verify_checkpoint(checkpoint, [TRAINING_STATE_FILE])
    path = checkpoint / TRAINING_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{checkpoint}' has no {TRAINING_STATE_FILE}")
    with unreadable_file(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"'{path}' does not hold a training state (a {type(state).__name__})",
                                     "use an earlier checkpoint of the run")
    if state.get("version") != TRAINING_STATE_VERSION:
        raise ValueError(f"{path}: training state version {state.get('version')} != {TRAINING_STATE_VERSION}")
    return state
