"""Issue 23 item 2 and issue 22 item 5: damage never switches verification off, and a file no reader can
deserialise is one line naming it, exit 2, on every reader (resume, merge, eval, drift, cache).

The readers are called through their CLI entry points in-process (`main(argv)`: the same `cli_entry` wrapper that
turns expected errors into one `error:` line and exit 2, and re-raises anything else); one case per kind runs the
real script in a subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safety_helpers import DATASET, finetune_args, one_error_line, run_cli, tree

from prismatic.integrity import CorruptCheckpointError, is_legacy_marker, verify_checkpoint

LEGACY_KEYS = ("step", "run_id", "lora", "merged", "time")  # what COMPLETE held before checksums were recorded


def _copy(finished: Path, tmp: Path, name: str = "done--1_chkpt") -> Path:
    return Path(shutil.copytree(finished / name, tmp / "ck" / name))


def _marker(chkpt: Path) -> dict:
    return json.loads((chkpt / "COMPLETE").read_text())


def _make_legacy(chkpt: Path) -> None:
    """Make the folder what the pre-checksum writer wrote: COMPLETE with the marker keys and a time (no sha256,
    no format), and no run_config.json (a resume then reads the run's config.yaml)."""
    marker = _marker(chkpt)
    (chkpt / "COMPLETE").write_text(json.dumps({k: marker[k] for k in LEGACY_KEYS}))
    (chkpt / "run_config.json").unlink()


def _flip(path: Path, where: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0x01
    path.write_bytes(bytes(data))


def _garble(path: Path) -> None:
    """What a torn copy leaves: the first 40 bytes, then junk (no reader can deserialise it)."""
    path.write_bytes(path.read_bytes()[:40] + b"\x00garbage" * 8)


def _resume(data_root: Path, chkpt: Path):
    import finetune

    argv = [str(a) for a in finetune_args(data_root, chkpt.parent, "--resume", "True", "--resume_step", "1",
                                          "--max_steps", "3", "--config_file_path", chkpt)[1:]]
    return lambda: finetune.main(argv)


# ---- item 2: a damaged marker is corruption, not "legacy" --------------------------------------------------------
def _torn(text: str) -> str:
    return text[: len(text) // 2]


MARKER_DAMAGE = {
    "torn": lambda text: _torn(text),
    "empty_file": lambda text: "",
    "empty_object": lambda text: "{}",
    "json_list": lambda text: "[]",
    "no_sha256_not_legacy": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "sha256"}),
    "sha256_not_a_table": lambda text: json.dumps({**json.loads(text), "sha256": "deadbeef"}),
    "sha256_table_emptied": lambda text: json.dumps({**json.loads(text), "sha256": {}}),
}


@pytest.mark.parametrize("damage", sorted(MARKER_DAMAGE))
def test_a_damaged_marker_is_a_corrupt_checkpoint(damage, finished_run, tmp_path):
    from prismatic.models.loaders import load_policy

    chkpt = _copy(finished_run, tmp_path)
    (chkpt / "COMPLETE").write_text(MARKER_DAMAGE[damage]((chkpt / "COMPLETE").read_text()))
    with pytest.raises(CorruptCheckpointError, match="done--1_chkpt"):
        verify_checkpoint(chkpt)
    with pytest.raises(CorruptCheckpointError):
        load_policy(chkpt)  # evaluation, drift, predict_action


def test_a_file_without_a_recorded_sha256_is_corrupt(finished_run, tmp_path):
    chkpt = _copy(finished_run, tmp_path)
    marker = _marker(chkpt)
    del marker["sha256"]["model.safetensors"]  # the marker lacks the checksum of a file that exists
    (chkpt / "COMPLETE").write_text(json.dumps(marker))
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors \(no sha256 recorded\)"):
        verify_checkpoint(chkpt)


def test_empty_marker_and_a_flipped_bit_resume_nothing_and_reseal_nothing(data_root, finished_run, tmp_path,
                                                                         capsys):
    """The issue's case: on main this resumed with rc 0 and wrote the flipped value into step 2 with a fresh sha256."""
    chkpt = _copy(finished_run, tmp_path)
    shutil.copytree(finished_run / "done", chkpt.parent / "done")  # the run folder: a resume appends to it
    _flip(chkpt / "lora_adapter" / "trainable_state.safetensors")
    (chkpt / "COMPLETE").write_text("")
    before = tree(chkpt.parent)
    line = one_error_line(capsys, _resume(data_root, chkpt))
    assert "corrupt" in line and "COMPLETE" in line and "done--1_chkpt" in line, line
    assert tree(chkpt.parent) == before  # no done--2_chkpt, no metrics line


def test_torn_marker_is_refused_by_merge(finished_run, tmp_path, capsys):
    import merge_lora_weights_and_save as merge

    chkpt = _copy(finished_run, tmp_path)
    (chkpt / "COMPLETE").write_text(_torn((chkpt / "COMPLETE").read_text()))
    line = one_error_line(capsys, lambda: merge.main(["--lora_finetuned_checkpoint_dir", str(chkpt),
                                                       "--output_dir", str(tmp_path / "merged")]))
    assert "COMPLETE" in line and "corrupt" in line, line
    assert not (tmp_path / "merged").exists()


def test_the_legacy_rule_is_positive():
    """Only the exact pre-checksum shape is legacy; anything less or more (or another step) is not."""
    legacy = {"step": 1, "run_id": "done", "lora": True, "merged": True, "time": "2026-01-01T00:00:00Z"}
    assert is_legacy_marker(Path("done--1_chkpt"), legacy)
    assert is_legacy_marker(Path("policy"), {"step": 3, "time": "t"})
    assert not is_legacy_marker(Path("done--1_chkpt"), {})
    assert not is_legacy_marker(Path("done--1_chkpt"), {**legacy, "step": 2})  # another checkpoint's marker
    assert not is_legacy_marker(Path("done--1_chkpt"), {k: v for k, v in legacy.items() if k != "time"})
    assert not is_legacy_marker(Path("done--1_chkpt"), {**legacy, "extra": 1})
    assert not is_legacy_marker(Path("done--1_chkpt"), {**legacy, "step": "1"})
    assert not is_legacy_marker(Path("done--1_chkpt"), {**legacy, "format": 2})


def test_a_checksum_era_marker_stripped_of_its_checksums_is_not_legacy(finished_run, tmp_path):
    chkpt = _copy(finished_run, tmp_path)
    marker = _marker(chkpt)
    (chkpt / "COMPLETE").write_text(json.dumps({k: marker[k] for k in LEGACY_KEYS}))  # run_config.json remains
    with pytest.raises(CorruptCheckpointError, match="records no checksums"):
        verify_checkpoint(chkpt)


def test_a_legacy_checkpoint_still_loads(finished_run, tmp_path):
    from prismatic.models.loaders import load_policy

    chkpt = _copy(finished_run, tmp_path)
    _make_legacy(chkpt)
    verify_checkpoint(chkpt)  # nothing recorded, nothing to verify
    load_policy(chkpt)


# ---- issue 22 item 5: unreadable torch / safetensors files, with and without checksums -------------------------
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy_marker", "checksummed"])
def test_corrupt_training_state_is_one_line_on_resume(legacy, data_root, finished_run, tmp_path, capsys):
    chkpt = _copy(finished_run, tmp_path)
    shutil.copytree(finished_run / "done", chkpt.parent / "done")
    if legacy:
        _make_legacy(chkpt)
    _garble(chkpt / "training_state.pt")
    before = tree(chkpt.parent)
    line = one_error_line(capsys, _resume(data_root, chkpt))
    assert "training_state.pt" in line, line
    assert ("cannot be read" if legacy else "sha256 differs") in line, line
    assert tree(chkpt.parent) == before


def test_corrupt_training_state_of_a_legacy_checkpoint_through_the_real_cli(data_root, finished_run, tmp_path):
    """On main: torch's UnpicklingError traceback, exit 1."""
    chkpt = _copy(finished_run, tmp_path)
    shutil.copytree(finished_run / "done", chkpt.parent / "done")
    _make_legacy(chkpt)
    _garble(chkpt / "training_state.pt")
    proc = run_cli(finetune_args(data_root, chkpt.parent, "--resume", "True", "--resume_step", "1", "--max_steps",
                                 "3", "--config_file_path", chkpt))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training_state.pt" in errors[0], proc.stderr[-3000:]


def test_corrupt_files_of_a_legacy_checkpoint_are_one_line_on_every_reader(data_root, finished_run, tmp_path,
                                                                          capsys):
    import build_craft_cache
    import measure_drift
    import merge_lora_weights_and_save as merge

    from LIBERO.policy_runner import load_policy_checkpoint

    # merge: the LoRA adapter's safetensors
    chkpt = _copy(finished_run, tmp_path)
    _make_legacy(chkpt)
    _garble(chkpt / "lora_adapter" / "trainable_state.safetensors")
    line = one_error_line(capsys, lambda: merge.main(["--lora_finetuned_checkpoint_dir", str(chkpt),
                                                       "--output_dir", str(tmp_path / "merged")]))
    assert "trainable_state.safetensors" in line and "cannot be read" in line, line
    assert not (tmp_path / "merged").exists()

    # evaluation (the LIBERO runner's loader), drift, cache build: the action head's torch file
    other = _copy(finished_run, tmp_path / "b")
    _make_legacy(other)
    head = next(other.glob("action_head--*_checkpoint.pt"))
    _garble(head)
    with pytest.raises(CorruptCheckpointError, match=head.name):
        load_policy_checkpoint(other)
    line = one_error_line(capsys, lambda: measure_drift.main([
        "--reference_path", str(other), "--finetuned_path", str(other), "--data_root_dir", str(data_root),
        "--dataset_name", DATASET, "--output_dir", str(tmp_path / "drift")]))
    assert head.name in line and "cannot be read" in line, line
    assert not (tmp_path / "drift").exists()
    line = one_error_line(capsys, lambda: build_craft_cache.main([
        "--config_file_path", str(other), "--model_preset", "tiny", "--cache_dir", str(tmp_path / "cache"),
        "--data_root_dir", str(data_root), "--dataset_name", DATASET, "--num_images_in_input", "1"]))
    assert head.name in line and "cannot be read" in line, line

    # the merged VLA weights (read through transformers' from_pretrained)
    third = _copy(finished_run, tmp_path / "c")
    _make_legacy(third)
    _garble(third / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_policy_checkpoint(third)


def test_a_damaged_cache_shard_without_checksums_is_one_line(tmp_path):
    import torch

    from prismatic.training.craft_cache import (
        MANIFEST_NAME,
        REQUIRED_MANIFEST_FIELDS,
        CraftCacheReader,
        CraftCacheWriter,
    )

    cache = tmp_path / "cache"
    with CraftCacheWriter(cache, {k: "x" for k in REQUIRED_MANIFEST_FIELDS} | {"feature_dim": 4},
                          shard_size=3) as writer:
        writer.add([f"s{i}" for i in range(5)], [f"h{i}" for i in range(5)], torch.arange(20.0).reshape(5, 4))
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    for shard in manifest["shards"]:
        shard.pop("sha256", None)  # a cache written before shard checksums
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    shard = cache / manifest["shards"][1]["file"]
    _garble(shard)
    with pytest.raises(CorruptCheckpointError, match=shard.name):
        CraftCacheReader(cache)
