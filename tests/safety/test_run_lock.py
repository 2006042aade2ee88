"""Issue 23 item 1: a folder has one writer. Every writer (finetune fresh and resumed, merge, cache build, LIBERO
eval, drift) takes the folder's OS lock before it writes anything; a second process stops with one line naming the
holder; a lock left by a killed process never blocks. Every case uses two real processes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safety_helpers import DATASET, REPO, cli_env, finetune_args, one_error_line, run_cli, tree

from prismatic.run_lock import FolderInUseError, acquire_folder_lock, lock_path

HOLDER = Path(__file__).with_name("lock_holder.py")


class Holder:
    """`python lock_holder.py <folder>`: returns once the other process holds the lock."""

    def __init__(self, folder: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HOLDER), str(folder)], cwd=REPO, env=cli_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        assert line.strip() == f"locked {self.proc.pid}", (line, self.proc.stderr.read() if line == "" else "")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def holder():
    started: list[Holder] = []

    def start(folder: Path) -> Holder:
        started.append(Holder(folder))
        return started[-1]

    yield start
    for h in started:
        h.kill()


def _refused(capsys, call, holder_pid: int) -> str:
    line = one_error_line(capsys, call)
    assert f"pid {holder_pid} on host {socket.gethostname()}" in line and "since" in line, line
    return line


# ---- the lock itself --------------------------------------------------------------------------------------------
def test_second_acquirer_is_refused_and_released_lock_is_free(tmp_path, holder):
    folder = tmp_path / "out"
    h = holder(folder)
    with pytest.raises(FolderInUseError, match=rf"pid {h.proc.pid} on host .*lock_holder"):
        acquire_folder_lock(folder, "test")
    recorded = json.loads(lock_path(folder).read_text())
    assert (recorded["pid"], recorded["host"], recorded["tool"]) == (h.proc.pid, socket.gethostname(), "lock_holder")
    h.kill()  # SIGKILL: no clean-up ran, the file is still there with the dead holder's identity
    assert json.loads(lock_path(folder).read_text())["pid"] == h.proc.pid
    lock = acquire_folder_lock(folder, "test")  # a killed holder never blocks
    assert json.loads(lock_path(folder).read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path(folder).exists() and not folder.exists()  # the lock writes nothing into the folder


def test_an_unwritable_output_parent_is_one_line(tmp_path, monkeypatch):
    from prismatic.cli_errors import UserError

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UserError, match="cannot write into .*a_file"):
        acquire_folder_lock(tmp_path / "a_file" / "runs" / "r", "test")  # ENOTDIR from the real filesystem
    real_open = os.open

    def read_only(path, *args, **kwargs):  # what a read-only mount answers (this test may run as root)
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(UserError, match="cannot write into .*Read-only file system"):
        acquire_folder_lock(tmp_path / "runs" / "r", "test")


# ---- every writer -----------------------------------------------------------------------------------------------
def test_finetune_fresh_run_is_refused_while_another_holds_its_run_id(data_root, tmp_path, holder, capsys):
    import finetune

    runs = tmp_path / "runs"
    h = holder(runs / "same")
    argv = [str(a) for a in finetune_args(data_root, runs, "--run_id", "same")[1:]]
    before = tree(tmp_path)
    line = _refused(capsys, lambda: finetune.main(argv), h.proc.pid)
    assert "--run_id" in line, line
    assert tree(tmp_path) == before  # no run folder, no config.yaml


def test_finetune_resume_is_refused_while_another_holds_the_run(data_root, finished_run, tmp_path, holder, capsys):
    import finetune

    runs = Path(shutil.copytree(finished_run, tmp_path / "runs"))
    h = holder(runs / "done")
    argv = [str(a) for a in finetune_args(data_root, runs, "--resume", "True", "--resume_step", "1", "--max_steps",
                                          "3", "--config_file_path", runs / "done--1_chkpt")[1:]]
    before = {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file() and not p.name.endswith(".lock")}
    _refused(capsys, lambda: finetune.main(argv), h.proc.pid)
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("*") if p.is_file() and not p.name.endswith(".lock")} \
        == before


def test_merge_cache_drift_and_eval_refuse_a_held_output_folder(data_root, finished_run, tmp_path, holder, capsys):
    import build_craft_cache
    import measure_drift
    import merge_lora_weights_and_save as merge

    from LIBERO import run_libero_eval

    chkpt = finished_run / "done--1_chkpt"
    cases = {
        "merged": lambda out: merge.main(["--lora_finetuned_checkpoint_dir", str(chkpt), "--output_dir", str(out)]),
        "cache": lambda out: build_craft_cache.main([
            "--model_preset", "tiny", "--cache_dir", str(out), "--data_root_dir", str(data_root), "--dataset_name",
            DATASET, "--num_images_in_input", "1"]),
        "drift": lambda out: measure_drift.main([
            "--reference_path", str(chkpt), "--finetuned_path", str(chkpt), "--data_root_dir", str(data_root),
            "--dataset_name", DATASET, "--output_dir", str(out)]),
        "eval": lambda out: run_libero_eval.main([
            "--pretrained_checkpoint", str(chkpt), "--task_suite_name", "libero_spatial", "--num_trials_per_task",
            "1", "--num_envs", "0", "--local_log_dir", str(out), "--progress", "false"]),
    }
    for name, call in cases.items():
        out = tmp_path / name
        h = holder(out)
        _refused(capsys, lambda call=call, out=out: call(out), h.proc.pid)
        assert not out.exists(), name  # nothing written into the held folder


def _pause_while_holding(proc: subprocess.Popen, folder: Path) -> None:
    """SIGSTOP `proc` once it holds `folder`'s lock (its pid is in the lock file): deterministic, whatever the speed."""
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        try:
            if json.loads(lock_path(folder).read_text())["pid"] == proc.pid:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGSTOP)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fresh", "resume"])
def test_two_real_finetune_processes_on_one_run(kind, data_root, finished_run, tmp_path):
    """fresh: the issue's case, seeds 7 and 9 with one --run_id; on main both exited 0, metrics.jsonl held steps
    [1,2,2,3,3] and every file said seed 9. resume: two resumes of one checkpoint at once. The second process stops
    in one line naming the first (paused while it holds the run); the first run is whole."""
    runs = tmp_path / "runs"
    if kind == "fresh":
        run = "same"
        first_args = finetune_args(data_root, runs, "--run_id", run, "--seed", "7", "--save_freq", "1")
        second_args = finetune_args(data_root, runs, "--run_id", run, "--seed", "9")
        expected = [1, 2]
    else:
        run = "done"
        shutil.copytree(finished_run, runs)
        first_args = second_args = finetune_args(data_root, runs, "--resume", "True", "--config_file_path",
                                                 runs / "done--1_chkpt", "--resume_step", "1", "--max_steps", "3",
                                                 "--save_freq", "1")
        expected = [1, 2, 3]
    first = subprocess.Popen([sys.executable, *map(str, first_args)], cwd=REPO, env=cli_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _pause_while_holding(first, runs / run)
        second = run_cli(second_args)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"pid {first.pid}" in errors[0] and "Traceback" not in second.stderr, second.stderr
    steps = [json.loads(line)["step"] for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
    assert steps == expected
    assert "seed: 7" in (runs / run / "config.yaml").read_text()
    for step in expected:
        assert json.loads((runs / f"{run}--{step}_chkpt" / "run_config.json").read_text())["seed"] == 7
    assert not lock_path(runs / run).exists()  # released at exit


def test_a_stale_lock_of_a_killed_process_never_blocks_a_resume(data_root, finished_run, tmp_path, holder):
    from finetune import train
    from prismatic.training.finetune_config import FinetuneConfig

    runs = Path(shutil.copytree(finished_run, tmp_path / "runs"))
    h = holder(runs / "done")
    h.kill()  # SIGKILL while holding: the lock file stays, naming a dead process
    assert lock_path(runs / "done").exists()
    result = train(FinetuneConfig(config_file_path=runs / "done--1_chkpt", resume=True, resume_step=1, max_steps=2,
                                  data_root_dir=data_root, dataset_name=DATASET, run_root_dir=runs,
                                  model_preset="tiny", batch_size=1, num_images_in_input=1, image_aug=False,
                                  wandb_mode="disabled", lora_rank=4, save_freq=1))
    assert result.final_step == 2 and not lock_path(runs / "done").exists()
