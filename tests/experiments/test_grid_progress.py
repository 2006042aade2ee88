"""Grids that say where they are (issue 24): `[k/N]`, per-run and total time, ETA, one summary line per run, the
tools' output only in per-run log files, EVAL_DEVICE resolved by the evaluation on its node, a small SMOKE selection."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "craft_experiments/common_utils"))
sys.path.insert(0, str(Path(__file__).parent))

from progress import Progress, duration  # noqa: E402
from test_experiment_scripts import (  # noqa: E402
    calls,
    dry_run,
    expected_run_id,
    fake_env,  # noqa: F401 (fixture)
    run_script,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_duration_format():
    assert [duration(s) for s in (0, 42.4, 185, 3600, 3725, 90061)] == ["0s", "42s", "3m05s", "1h00m", "1h02m",
                                                                          "25h01m"]


def test_progress_counts_times_and_eta_from_the_runs_that_worked():
    clock = FakeClock()
    p = Progress(4, clock=clock)
    assert p.begin_run() == "[1/4]"
    clock.now += 5  # a finished run found and skipped: no step, not timed for the ETA
    assert p.end_run() == "nothing to do | run 5s | elapsed 5s | ETA – (3 run(s) left, none timed yet)"
    assert p.begin_run() == "[2/4]"
    p.step("train", 100.0)
    p.step("eval", 20.0)
    clock.now += 120
    assert p.end_run() == "train 1m40s, eval 20s | run 2m00s | elapsed 2m05s | ETA 4m00s (2 run(s) left)"
    p.begin_run()
    p.step("train", 240.0)
    clock.now += 240
    # mean of the timed runs (120 s, 240 s) = 180 s, one run left
    assert p.end_run().endswith("| elapsed 6m05s | ETA 3m00s (1 run(s) left)")
    p.begin_run()
    assert p.end_run().endswith("ETA 0s (last run)")


def test_grid_prints_counter_times_and_one_summary_line_per_run(tmp_path, fake_env):  # noqa: F811
    env = {**fake_env, "SUITES": "libero_goal libero_10", "SEEDS": "1", "MAX_STEPS": "5000",
           "METHODS": "baseline craft"}
    proc = run_script("table1", tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    done = [line for line in proc.stdout.splitlines() if " done t1-" in line]
    assert [line.split()[1] for line in done] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    for line in done:
        assert "train " in line and "drift " in line and "eval " in line and "| run " in line
        assert "| elapsed " in line and "| ETA " in line and "| success " in line and "/10 (" in line
    assert done[-1].count("ETA 0s (last run)") == 1 and "# total time " in proc.stdout
    # the tools' own output is in the per-run logs, not on the grid's stdout
    assert "chatter" not in proc.stdout
    run_id = expected_run_id("t1", "libero_10", "craft", 1, True, lr="2e-4")
    assert "finetune.py chatter" in (tmp_path / "out/table1/logs" / f"{run_id}.train.log").read_text()
    again = run_script("table1", tmp_path, **env)
    assert again.stdout.count("nothing to do") == 4 and len(calls(tmp_path)) == 12


def test_a_failure_shows_the_tail_of_its_log(tmp_path, fake_env):  # noqa: F811
    failing = expected_run_id("t1", "libero_goal", "baseline", 1, False)
    proc = run_script("table1", tmp_path, **{**fake_env, "SUITES": "libero_goal", "SEEDS": "1", "MAX_STEPS": "5000",
                                             "FAKE_FAIL_ON": failing})
    assert proc.returncode == 3
    assert f"  | fake failure of {failing}" in proc.stderr and "FAILED (exit 3) [train]" in proc.stderr


def test_eval_device_is_left_to_the_evaluating_node(tmp_path):
    commands, proc = dry_run("table1", tmp_path, SEEDS="7", SUITES="libero_goal", METHODS="baseline")
    (ev,) = [f for kind, f in commands if kind == "eval"]
    assert ev["device"] == "auto"
    commands, _ = dry_run("table1", tmp_path, SEEDS="7", SUITES="libero_goal", METHODS="baseline",
                          EVAL_DEVICE="cuda:1")
    assert [f["device"] for kind, f in commands if kind == "eval"] == ["cuda:1"]
    bad = run_script("table1", tmp_path, DRY_RUN="1", EVAL_DEVICE="gpu")
    assert bad.returncode == 2 and "EVAL_DEVICE must be auto, cpu, cuda or cuda:<index>" in bad.stderr


@pytest.mark.parametrize("name, small, full", [("table1", 3, 36), ("fewshot", 3, 72), ("ablations", 4, 51)])
def test_smoke_alone_is_a_small_selection_and_smoke_full_the_whole_grid(tmp_path, name, small, full):
    env = {"SMOKE": "1", "SMOKE_DATA_ROOT": "d", "SMOKE_VLM_PATH": "v"}
    commands, _ = dry_run(name, tmp_path, **env)
    trains = [f for kind, f in commands if kind == "train"]
    assert len(trains) == small and {f["seed"] for f in trains} == {"7"}
    assert {f["dataset_name"] for f in trains} == {"libero_spatial_no_noops"}
    assert sum(kind == "cache" for kind, _ in commands) == (1 if name == "ablations" else 0)
    commands, _ = dry_run(name, tmp_path, SMOKE_FULL="1", **env)
    assert sum(kind == "train" for kind, _ in commands) == full
