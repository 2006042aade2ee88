"""run_libero_eval.py answers bad input with ONE stderr line `error: <what> — <how to fix>`, exit 2, no traceback,
before anything is built, and leaves no eval folder behind (real script, run as a user would, in a subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from libero_fakes import needs_libero

SCRIPT = Path(__file__).resolve().parents[2] / "LIBERO" / "run_libero_eval.py"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_policy_factory) -> dict[str, Path]:
    """A complete tiny checkpoint (center_crop recorded False), and broken copies of it."""
    root = tmp_path_factory.mktemp("ckpts")
    good = root / "tiny--5_chkpt"
    tiny_policy_factory(0).save_pretrained(good, step=5)
    assert json.loads((good / "prismatic_processor_config.json").read_text())["center_crop"] is False
    no_stats = root / "nostats--5_chkpt"
    shutil.copytree(good, no_stats)
    (no_stats / "dataset_statistics.json").unlink()
    no_weights = root / "noweights--5_chkpt"
    shutil.copytree(good, no_weights, ignore=shutil.ignore_patterns("*.safetensors", "*.pt"))
    return {"good": good, "no_stats": no_stats, "no_weights": no_weights, "missing": root / "missing--5_chkpt"}


# (case id, checkpoint, extra args, words the message must contain); ~5-10 s each (python + torch start-up), so
# six representative cases run by default and the rest with the slow tests
def fast(*case):
    return pytest.param(*case, id=case[0])


def slow(*case):
    return pytest.param(*case, id=case[0], marks=pytest.mark.slow)


CASES = [
    fast("unknown_suite", "good", ["--task_suite_name", "libero_spacial"], ["libero_spacial", "libero_spatial"]),
    fast("missing_checkpoint", "missing", [], ["missing--5_chkpt", "does not exist"]),
    fast("zero_trials", "good", ["--num_trials_per_task", "0"], ["--num_trials_per_task 0", ">= 1"]),
    fast("negative_num_envs", "good", ["--num_envs", "-1"], ["--num_envs -1"]),
    fast("non_integer_num_envs", "good", ["--num_envs", "two"], ["num_envs", "'two'"]),
    fast("unknown_flag", "good", ["--num_env", "2"], ["unrecognized arguments: --num_env 2"]),
    slow("no_checkpoint_flag", None, [], ["--pretrained_checkpoint"]),
    slow("checkpoint_without_stats", "no_stats", [], ["no action statistics", "dataset_statistics.json"]),
    slow("checkpoint_without_weights", "no_weights", [], ["no weight files"]),
    slow("too_many_trials", "good", ["--num_trials_per_task", "51"], ["only 50 fixed init states"]),
    slow("bad_task_id", "good", ["--task_ids", "[3, 12]"], ["--task_ids [12]", "0..9"]),
    slow("bad_device", "good", ["--device", "gpu"], ["--device 'gpu'"]),
    slow("bad_dtype", "good", ["--dtype", "float16"], ["--dtype 'float16'", "bfloat16"]),
    slow("center_crop_contradiction", "good", ["--center_crop", "true"], ["--center_crop True", "center_crop=False"]),
    slow("three_images", "good", ["--num_images_in_input", "3"], ["--num_images_in_input 3"]),
    slow("bad_unnorm_key", "good", ["--unnorm_key", "bridge"], ["'bridge'"]),
]


@pytest.mark.libero
@needs_libero
@pytest.mark.parametrize("case,checkpoint,args,words", CASES)
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, checkpoint, args, words, checkpoints, tmp_path):
    out = tmp_path / "eval_out"
    argv = [sys.executable, str(SCRIPT), "--local_log_dir", str(out), "--progress", "false", *args]
    if checkpoint is not None:
        argv += ["--pretrained_checkpoint", str(checkpoints[checkpoint])]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and " — " in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for word in words:
        assert word in lines[0]
    assert not out.exists()  # nothing written that could pass for an evaluation


@pytest.mark.libero
@needs_libero
def test_debug_shows_the_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--num_envs", "-1", "--debug", "true",
                           "--local_log_dir", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "UserError" in proc.stderr
