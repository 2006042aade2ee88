"""`vla-scripts/finetune.py` as users run it: flag errors at start-up, SIGTERM -> checkpoint + exit code 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prismatic.training.checkpointing import is_complete_checkpoint, list_checkpoints, load_training_state

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "vla-scripts" / "finetune.py"
DATASET = "synthetic_libero_no_noops"


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _args(data_root: Path, run_root: Path, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--data_root_dir", str(data_root), "--dataset_name", DATASET,
            "--run_root_dir", str(run_root), "--model_preset", "tiny", "--batch_size", "1",
            "--num_images_in_input", "1", "--image_aug", "False", "--wandb_mode", "disabled", "--use_lora", "True",
            "--lora_rank", "4", "--run_id", "cli", *extra]


def test_cli_rejects_bad_flags_at_startup(tiny_data_root, tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run(_args(tiny_data_root, tmp_path / "runs", "--batch_size", "0", "--model_preset", "huge"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--batch_size must be > 0, got 0" in proc.stderr
    assert "--model_preset must be one of ('real', 'tiny'), got 'huge'" in proc.stderr
    assert not (tmp_path / "runs").exists()
    assert time.monotonic() - t0 < 60


def test_cli_rejects_bad_nupi_flags_in_one_line_each(tiny_data_root, tmp_path):
    """The dual controller flags of issue 26: every problem named, exit 2, no traceback, nothing written."""
    proc = subprocess.run(_args(tiny_data_root, tmp_path / "runs", "--use_craft", "True", "--craft_dual_mode", "nupi",
                                "--craft_dual_nu", "1.0", "--craft_dual_setpoint", "0", "--craft_dual_kd", "0.5"),
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for needle in ("--craft_dual_nu must be in [0, 1), got 1.0", "--craft_dual_setpoint must be in (0, 1]",
                   "--craft_dual_kd needs --craft_dual_mode pid (nupi has no derivative term)"):
        assert sum(needle in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_zero(tiny_data_root, tmp_path):
    run_root = tmp_path / "runs"
    proc = subprocess.Popen(_args(tiny_data_root, run_root, "--max_steps", "100000", "--save_freq", "100000"),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_root / "cli" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
    checkpoints = list_checkpoints(run_root, "cli")
    assert [step for step, _ in checkpoints] == [last_logged]
    path = checkpoints[0][1]
    assert is_complete_checkpoint(path) and load_training_state(path)["step"] == last_logged
