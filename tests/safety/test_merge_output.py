"""Issue 23 item 4: merge_lora writes only new folders (or replaces one with --overwrite True, saying what it
replaces), atomically, sealed with its own COMPLETE marker and checksums."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safety_helpers import REPO, run_cli

from prismatic.integrity import verify_checkpoint

MERGE = REPO / "vla-scripts" / "merge_lora_weights_and_save.py"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _one_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_merging_step_2_into_step_1s_folder_is_refused(finished_run, tmp_path):
    """The issue's case: on main rc 0, and step 1 then failed verification."""
    runs = Path(shutil.copytree(finished_run, tmp_path / "runs"))
    step1 = _snapshot(runs / "done--1_chkpt")
    line = _one_line(run_cli([MERGE, "--lora_finetuned_checkpoint_dir", runs / "done--2_chkpt", "--output_dir",
                              runs / "done--1_chkpt"]))
    assert "already holds files" in line and "--overwrite True" in line, line
    assert _snapshot(runs / "done--1_chkpt") == step1
    verify_checkpoint(runs / "done--1_chkpt")


def test_a_non_empty_folder_is_refused_and_overwrite_names_what_it_replaces(finished_run, tmp_path):
    from merge_lora_weights_and_save import merge_lora_checkpoint

    from prismatic.cli_errors import UserError

    out = tmp_path / "deploy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds files \(notes.txt\)"):
        merge_lora_checkpoint(finished_run / "done--2_chkpt", out)
    assert _snapshot(out) == {"notes.txt": b"mine"}
    proc = run_cli([MERGE, "--lora_finetuned_checkpoint_dir", finished_run / "done--2_chkpt", "--output_dir", out,
                    "--overwrite", "True"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"replacing '{out}' (1 entries: notes.txt)" in proc.stdout, proc.stdout
    assert not (out / "notes.txt").exists()
    verify_checkpoint(out)
    assert json.loads((out / "COMPLETE").read_text())["step"] == 2


def test_a_failed_merge_leaves_the_previous_output_whole(finished_run, tmp_path, monkeypatch):
    from merge_lora_weights_and_save import merge_lora_checkpoint

    from prismatic.models.policy import VLAPolicy

    out = merge_lora_checkpoint(finished_run / "done--1_chkpt", tmp_path / "deploy")
    before = _snapshot(out)

    def fail_half_way(self, directory, step):
        (Path(directory) / "config.json").write_text("{}")
        raise OSError("simulated failure half way through the write")

    monkeypatch.setattr(VLAPolicy, "save_pretrained", fail_half_way)
    with pytest.raises(OSError, match="half way"):
        merge_lora_checkpoint(finished_run / "done--2_chkpt", out, overwrite=True)
    assert _snapshot(out) == before  # the replacement is atomic: the old merge is still there, still sealed
    verify_checkpoint(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
