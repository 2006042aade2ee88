"""Helpers of the run-safety tests (a module of its own: `conftest` names clash across test folders)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "vla-scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "vla-scripts"))

torch.set_num_threads(1)

DATASET = "synthetic_libero_no_noops"


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO)  # this checkout, not an installed copy
    return env


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *[str(a) for a in args]], cwd=REPO, env=cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def finetune_args(data_root: Path, run_root: Path, *extra) -> list:
    return [REPO / "vla-scripts" / "finetune.py", "--data_root_dir", data_root, "--dataset_name", DATASET,
            "--run_root_dir", run_root, "--model_preset", "tiny", "--batch_size", "1", "--num_images_in_input", "1",
            "--image_aug", "False", "--wandb_mode", "disabled", "--lora_rank", "4", "--max_steps", "2", *extra]


def tree(root: Path) -> set[str]:
    """Every path under `root` (what a failed command must not have added to)."""
    root = Path(root)
    return {p.relative_to(root).as_posix() for p in root.rglob("*")} if root.exists() else set()


def shard_of(root: Path) -> Path:
    return next((root / DATASET / "1.0.0").glob("*.tfrecord-*"))


def one_error_line(capsys, call) -> str:
    """Run `call`, which must end the process the CLI way: exit 2, no traceback, exactly one `error: <what> — <fix>`
    line on stderr; returns that line."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and " — " in lines[0], err
    return lines[0]
